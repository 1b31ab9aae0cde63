"""The official DPO repository's loss (eric-mitchell/direct-preference-optimization, trainers.py,
``preference_loss``), written out here in PyTorch from the paper's code: DPO, cDPO through
label_smoothing, IPO through ``ipo=True``, and the reference-free switch.

The trainer computes the reference log-probs under torch.no_grad() and, for IPO, passes
per-token averaged log-probs (average_log_prob=ipo); this function sees neither choice.
"""

import torch
import torch.nn.functional as F


def preference_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
                    beta: float, label_smoothing: float = 0.0, ipo: bool = False, reference_free: bool = False):
    """Per-pair losses, chosen rewards and rejected rewards; every tensor (N,)."""
    pi_logratios = policy_chosen_logps - policy_rejected_logps  # (N,)
    ref_logratios = reference_chosen_logps - reference_rejected_logps  # (N,)
    if reference_free:
        ref_logratios = 0
    logits = pi_logratios - ref_logratios  # h, the log-ratio margin

    if ipo:
        losses = (logits - 1 / (2 * beta)) ** 2  # IPO (Azar et al.), eq. 17 of their paper
    else:
        # eq. 7; with label_smoothing = eps, the conservative (cDPO) mixture of both label directions
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing

    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()  # eq. 8
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards
