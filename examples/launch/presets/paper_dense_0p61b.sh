# Preset: a dense model of about 0.61B parameters, the smaller dense scale of the KHA paper
# (arXiv 2510.23052). Sourced by the launchers (PRESET=paper_dense_0p61b); every value can be
# overridden from the environment.
#
# The paper's exact dense configurations were not available to us: these shapes are our choice,
# sized to the parameter count with head dim 128 and GQA as in the paper's MoE model:
#   16 layers, hidden 1280, SwiGLU FFN 3584, 10 query heads / 2 KV heads (head dim 128);
#   with an untied ~128K vocabulary: 16 * 17.7M (layers) + 0.33B (embeddings) = 0.61B.
#   Training (also our choice): sequence length 4096, global batch 512 (2M tokens), 47,684
#   iterations = 100B tokens, peak LR 6e-4 cosine to 6e-5, 1,000 warm-up iterations.
: "${NUM_LAYERS:=16}"
: "${HIDDEN_SIZE:=1280}"
: "${FFN_HIDDEN_SIZE:=3584}"
: "${NUM_ATTENTION_HEADS:=10}"
: "${NUM_QUERY_GROUPS:=2}"
: "${NUM_EXPERTS:=0}"
: "${QK_LAYERNORM:=1}"
: "${SEQ_LENGTH:=4096}"
: "${MICRO_BATCH_SIZE:=4}"
: "${GLOBAL_BATCH_SIZE:=512}"
: "${TRAIN_ITERS:=47684}"
: "${LR:=6e-4}"
: "${MIN_LR:=6e-5}"
: "${LR_WARMUP_ITERS:=1000}"
: "${ATTENTION_VARIANT:=kha}"
: "${KHA_TARGETS:=v}"
: "${KHA_TYPE:=linear}"
# One 8-GPU node, data parallel only (TP must divide the 2 KV heads and 10 query heads: 1 or 2).
: "${TP:=1}"
: "${PP:=1}"
: "${EP:=1}"
