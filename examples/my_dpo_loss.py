"""A DPO loss as it is often written in PyTorch, to show `minidpo verify` at work.

    minidpo verify examples/my_dpo_loss.py:dpo_loss --framework torch
    minidpo verify examples/my_dpo_loss.py:cdpo_loss --framework torch --variant cdpo

dpo_loss is right. cdpo_loss has a bug found in real code: the flipped-label term of
conservative DPO enters with the wrong sign.
"""

import torch
import torch.nn.functional as F


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Eq. 7 of the DPO paper, per pair, and the eq. 8 rewards; all (N,)."""
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    losses = -F.logsigmoid(beta * logits)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def cdpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
              label_smoothing=0.0):
    """Label-smoothed (conservative) DPO -- with the sign of the second term wrong."""
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) + label_smoothing * F.logsigmoid(-beta * logits)
    return losses.mean()
