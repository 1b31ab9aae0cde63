"""minidpo: Direct Preference Optimization (Rafailov et al., 2023) from array code.

Modules, one idea each (see README.md for the equation-to-code map):
  backend     the xp switch (NumPy on CPU, CuPy on CUDA)
  layers      paired forward/backward functions of the GPT-2 layers
  model       GPTConfig, parameters keyed by GPT-2 names, gpt_forward / gpt_backward
  logprobs    log pi(y|x) as a sum of response-token log-probs, and its backward
  losses      eq. 2 reward-model loss, eq. 7 DPO and variants, eq. 8 rewards, eq. 9 gradient
  theory      the tabular world: eq. 3 objective, eq. 4 optimum, Z(x), eq. 5 reward
"""

__version__ = "0.1.0"
