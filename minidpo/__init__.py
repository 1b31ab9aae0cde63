"""minidpo: Direct Preference Optimization (Rafailov et al., 2023) from array code.

Modules, one idea each, the data flowing down this list (see README.md for the reading order
and the equation-to-code map):
  backend     the xp switch (NumPy on CPU, CuPy on CUDA)
  checks      argument checks, one call at the top of each public function
  layers      the plain reference: paired forward/backward functions of the GPT-2 layers
  logprobs    the plain reference: log pi(y|x) as a sum of response-token log-probs, and its backward
  kernels     fused CuPy kernels and their plain twins
  cpu_kernels, mkl_blas    fused CPU kernels (Numba), MKL's GEMM: the `fast` extra
  runtime     the fast path's process settings: threads, memory, the compiled-code loaders
  fast        layers and logprobs made fast (the default), and the plain/fast switch
  packing     the batch: token rows, their layout as data (positions, who sees whom), the
              scored tokens; padded, shared-prompt and packed layouts, decided once (Batcher)
  model       GPTConfig, parameters keyed by GPT-2 names, ONE block function for every layout,
              gpt_forward / gpt_backward, the KV-cache forward
  losses      eq. 2 reward-model loss, eq. 7 DPO and variants, eq. 8 rewards, eq. 9 gradient
  theory      the tabular world: eq. 3 objective, eq. 4 optimum, Z(x), eq. 5 reward
  optim       AdamW, clipping, learning-rate schedule
  tokenizer, data          BPE; JSONL -> validated, tokenized examples
  scoring     log pi(y|x) of many sequences without gradients
  train       SFT and DPO steps and loops
  generate, evaluate       sampling with a KV cache; held-out metrics, KL from samples
  checkpoint, pretrained   safetensors checkpoints; Hugging Face GPT-2 directories
  cli, plots, tasks        the `minidpo` command; figures; tasks with a ground-truth reward
"""

__version__ = "0.1.0"
