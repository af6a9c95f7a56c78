"""A one-rank world inside the pytest process, for tests that need no parallelism."""
from megatron_kha.world import ensure_single_process_world as ensure_single_rank  # noqa: F401
