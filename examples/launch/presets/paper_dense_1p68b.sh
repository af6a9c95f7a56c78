# Preset: a dense model of about 1.68B parameters, the larger dense scale of the KHA paper
# (arXiv 2510.23052). Sourced by the launchers (PRESET=paper_dense_1p68b); every value can be
# overridden from the environment.
#
# The paper's exact dense configurations were not available to us: these shapes are our choice,
# sized to the parameter count with head dim 128 and GQA as in the paper's MoE model:
#   24 layers, hidden 2048, SwiGLU FFN 6144, 16 query heads / 4 KV heads (head dim 128);
#   with an untied ~128K vocabulary: 24 * 48.2M (layers) + 0.52B (embeddings) = 1.68B.
#   Training (also our choice): sequence length 4096, global batch 512 (2M tokens), 47,684
#   iterations = 100B tokens, peak LR 4e-4 cosine to 4e-5, 1,000 warm-up iterations.
: "${NUM_LAYERS:=24}"
: "${HIDDEN_SIZE:=2048}"
: "${FFN_HIDDEN_SIZE:=6144}"
: "${NUM_ATTENTION_HEADS:=16}"
: "${NUM_QUERY_GROUPS:=4}"
: "${NUM_EXPERTS:=0}"
: "${QK_LAYERNORM:=1}"
: "${SEQ_LENGTH:=4096}"
: "${MICRO_BATCH_SIZE:=2}"
: "${GLOBAL_BATCH_SIZE:=512}"
: "${TRAIN_ITERS:=47684}"
: "${LR:=4e-4}"
: "${MIN_LR:=4e-5}"
: "${LR_WARMUP_ITERS:=1000}"
: "${ATTENTION_VARIANT:=kha}"
: "${KHA_TARGETS:=v}"
: "${KHA_TYPE:=linear}"
# One 8-GPU node: TP=2 (divides the 4 KV heads) x 4-way data parallel.
: "${TP:=2}"
: "${PP:=1}"
: "${EP:=1}"
