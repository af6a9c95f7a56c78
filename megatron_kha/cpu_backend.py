"""Run Megatron-Core 0.16.1 *local* specs on a CPU build of torch (gloo backend).

Megatron-Core assumes CUDA in a few dozen call sites. On a CPU-only torch build they
raise ("Torch not compiled with CUDA enabled") or, for `torch.cuda.manual_seed`, do
nothing; each redirection below turns such a call into its CPU equivalent and leaves
everything that already works alone. `enable_cpu_backend()` installs them once, and
only when CUDA is unavailable.

Why each redirection exists (details next to each function):
- buffers: ~20 Megatron modules (GlobalMemoryBuffer, TP/SP all-gather and
  reduce-scatter buffers, p2p shape tensors, DDP grad buffers, router, experts) allocate
  with `device=torch.cuda.current_device()`. This is the one global patch: too many
  modules to patch one by one, and on a CPU build the original can only raise.
- modules that build tensors with `device="cuda"`, call `torch.cuda.synchronize()` or
  create `torch.cuda.Stream`s get a *view* of `torch` in their own globals
  (`_TorchOnCpu`): factories map "cuda" to CPU, `torch.cuda` gets CPU stand-ins
  (synchronize is a no-op, streams/events are synchronous dummies). Other modules and
  user code still see the real `torch`.
- RNG: `model_parallel_cuda_manual_seed` seeds the CUDA generator and registers named
  CUDA states; on a CPU build `torch.cuda.manual_seed` silently queues a lazy call that
  never runs. Here the "device" generator is the CPU default generator: random.py sees
  `torch.cuda.manual_seed/get_rng_state` as the CPU ones and its state get/set helpers
  use the CPU generator, so Megatron's own CudaRNGStatesTracker keeps named CPU
  generator states. Semantics hold: same default seed on all ranks, a per-TP-rank seed
  inside `fork()`, per-EP/ETP-rank inside `fork("expert-parallel-rng")`; activation
  recompute restores them. Its "CPU RNG state changed" warning is filtered (on CPU the
  forked state *is* the CPU state).
- `Tensor.cuda()` is called on two paths (PP>1 tied embeddings, fully-parallel
  dist-ckpt load); it returns `self` only while those two functions run.
- MoE: moe_utils.py references `te_general_gemm` without TE (NameError in 0.16.1),
  and the alltoall dispatcher needs its split sizes as host numpy arrays.
- sequence parallel with a bare layer spec: TransformerBlock's default final norm
  (WrappedTorchNorm) asserts on SP; megatron_kha.norms.LocalNorm replaces it.
- optimizer: clip_grads asserts `grad.type() == 'torch.cuda.FloatTensor'`; a CPU copy
  of the clipping helper checks float32 instead.
Not covered: the distributed optimizer and the fp16/bf16 Megatron optimizers (both check
for CUDA tensor types), Transformer-Engine specs, CUDA graphs.
"""
import contextlib
import functools
import importlib
import logging
import types

import torch

_INSTALLED = False
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "empty_like", "zeros_like")


def _cpu_device(device):
    """Map a CUDA device spec ("cuda", "cuda:0", 0, torch.device) to "cpu"; keep others."""
    if isinstance(device, int) or (device is not None and torch.device(device).type == "cuda"):
        return "cpu"
    return device


class _SyncStream:
    """Stand-in for torch.cuda.Stream/Event: CPU work is synchronous, so all no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event if event is not None else _SyncStream()

    def query(self):
        return True

    def _nothing(self, *args, **kwargs):
        return None

    wait_stream = wait_event = record = wait = synchronize = _nothing


class _CudaOnCpu(types.SimpleNamespace):
    """`torch.cuda` with CPU stand-ins for the given names; everything else is the real one."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchOnCpu(types.ModuleType):
    """`torch` as seen by one Megatron module: "cuda" tensors and streams live on CPU."""

    def __init__(self, **cuda_overrides):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, self._on_cpu(getattr(torch, name)))
        _stream = _SyncStream()
        cuda = dict(synchronize=lambda *a, **k: None, Stream=_SyncStream, Event=_SyncStream,
                    current_stream=lambda *a, **k: _stream, default_stream=lambda *a, **k: _stream,
                    stream=lambda *a, **k: contextlib.nullcontext(), **cuda_overrides)
        self.cuda = _CudaOnCpu(**cuda)

    @staticmethod
    def _on_cpu(factory):
        @functools.wraps(factory)
        def wrapper(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return factory(*args, **kwargs)
        return wrapper

    def __getattr__(self, name):
        return getattr(torch, name)


def _view_torch(module_name, **cuda_overrides):
    """Give one Megatron module a CPU view of `torch` in its globals; return the module."""
    module = importlib.import_module(module_name)
    module.torch = _TorchOnCpu(**cuda_overrides)
    return module


@contextlib.contextmanager
def _tensor_cuda_returns_self():
    """While active, `Tensor.cuda()` is the identity (restored afterwards)."""
    had_own, original = "cuda" in vars(torch.Tensor), torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        if had_own:
            torch.Tensor.cuda = original
        else:
            del torch.Tensor.cuda


def _with_tensor_cuda_returning_self(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _tensor_cuda_returns_self():
            return fn(*args, **kwargs)
    return wrapper


def _current_device_is_cpu():
    # utils.GlobalMemoryBuffer, tensor_parallel mappings/layers, p2p shapes, DDP buffers, MoE
    torch.cuda.current_device = lambda: torch.device("cpu")


def _cpu_rng():
    # tensor_parallel/random.py: model_parallel_cuda_manual_seed, CudaRNGStatesTracker.add/fork
    from megatron.core.tensor_parallel import random as tp_random

    # torch.cuda.manual_seed would only queue a lazy call that never runs on a CPU build
    _view_torch(tp_random.__name__, manual_seed=torch.manual_seed,
                get_rng_state=torch.get_rng_state)
    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    # fork() warns when the CPU state changes inside it; here that is the forked state itself
    logging.getLogger(tp_random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage()
    )


def _causal_mask():
    # transformer/utils.py get_default_causal_mask (attention_mask=None): device="cuda"
    _view_torch("megatron.core.transformer.utils")


def _pipeline_parallel():
    # schedules.py: torch.zeros(..., device="cuda"); p2p_communication.py: torch.cuda.synchronize()
    _view_torch("megatron.core.pipeline_parallel.schedules")
    _view_torch("megatron.core.pipeline_parallel.p2p_communication")


def _tied_embeddings():
    # models/common/language_module: setup_embeddings_and_output_layer calls weight.data.cuda()
    from megatron.core.models.common.language_module.language_module import LanguageModule

    LanguageModule.setup_embeddings_and_output_layer = _with_tensor_cuda_returning_self(
        LanguageModule.setup_embeddings_and_output_layer
    )


def _moe():
    # moe_utils.py:1192 te_general_gemm undefined without TE; device="cuda" aux-loss tracker
    moe_utils = _view_torch("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    # token_dispatcher.py: MoEAlltoAllTokenDispatcher needs torch.cuda.Stream and host splits
    dispatcher = _view_torch("megatron.core.transformer.moe.token_dispatcher")

    def splits_to_host(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor):
            return tensor.numpy()  # all_to_all_single wants sizes as a list/array, not a tensor
        return tensor

    dispatcher.maybe_move_tensor_to_cpu = splits_to_host


def _optimizer():
    # optimizer.py (FP32Optimizer._scale, ChainedOptimizer) and clip_grads.py: device='cuda'
    optimizer = _view_torch("megatron.core.optimizer.optimizer")
    clip_grads = _view_torch("megatron.core.optimizer.clip_grads")
    # clip_grads.get_grad_norm_fp32 -> utils.local_multi_tensor_l2_norm: device="cuda" result
    clip_grads.l2_norm_impl = lambda chunk, flag, lists, per_tensor, *args: (
        torch.norm(torch.stack([torch.norm(t.float()) for ts in lists for t in ts])).reshape(1),
        None,
    )

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        """clip_grads.clip_grad_by_total_norm_fp32 asserting float32 instead of cuda.FloatTensor."""
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
        assert all(g.dtype == torch.float32 for g in grads), "expected fp32 main grads"
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            for grad in grads:
                grad.detach().mul_(clip_coeff)

    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


def _dist_checkpointing():
    # strategies/filesystem_async.py: torch.cuda.synchronize() after staging tensors to CPU
    _view_torch("megatron.core.dist_checkpointing.strategies.filesystem_async")
    # FullyParallelLoadStrategyWrapper.load: torch.cuda.synchronize(); exchange_utils.py:
    # torch.empty*(device="cuda") and tensor.cuda() while exchanging loaded shards
    _view_torch("megatron.core.dist_checkpointing.exchange_utils")
    fully_parallel = _view_torch("megatron.core.dist_checkpointing.strategies.fully_parallel")
    fully_parallel.exchange_by_distribution = _with_tensor_cuda_returning_self(
        fully_parallel.exchange_by_distribution
    )
    # mapping.py ShardedTensor.init_data("cuda") from exchange_utils._get_empty_tensor_for_exchange
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    init_data = ShardedTensor.init_data
    ShardedTensor.init_data = functools.wraps(init_data)(
        lambda self, device, init_fn=torch.empty: init_data(self, _cpu_device(device), init_fn)
    )


def _sequence_parallel_norm():
    # transformer_block.py: a bare layer spec gets LayerNormImpl (WrappedTorchNorm without apex/TE)
    # as its final norm, which asserts on sequence_parallel; LocalNorm is the same torch norm, SP-aware.
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_kha.norms import LocalNorm

    if transformer_block.LayerNormImpl is WrappedTorchNorm:
        transformer_block.LayerNormImpl = LocalNorm


def enable_cpu_backend() -> bool:
    """Install the CPU redirections for Megatron-Core local specs (see module docstring).

    Returns True when it installed them; False when CUDA is available (nothing to do) or
    when they were already installed (idempotent). Call it before building models and
    before `model_parallel_cuda_manual_seed`; use the gloo process-group backend.
    """
    global _INSTALLED
    if _INSTALLED or torch.cuda.is_available():
        return False
    for redirection in (_current_device_is_cpu, _cpu_rng, _causal_mask, _pipeline_parallel,
                        _tied_embeddings, _moe, _optimizer, _dist_checkpointing, _sequence_parallel_norm):
        redirection()
    _INSTALLED = True
    return True
