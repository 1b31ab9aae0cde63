"""minidpo's loss family against Hugging Face TRL 1.16's own implementations (the crosscheck extra).

TRL computes its losses inside its trainers' loss step, from a model's outputs and a batch, not as
free functions. These tests run that step itself -- DPOTrainer._compute_loss, KTOTrainer._compute_loss,
CPOTrainer.get_batch_loss_metrics / cpo_loss, ORPOTrainer.get_batch_loss_metrics / odds_ratio_loss --
on a trainer object holding just the settings the step reads, and a stand-in for the model: one
that returns the per-token log-probs TRL's fused LM head would (DPO, KTO), or logits from which
TRL computes the log-probs and its NLL term itself (CPO, SimPO, ORPO). The loss and its gradient
(torch autograd through TRL's code) are compared with minidpo's value and hand-written gradient
carried to the same per-token log-probs or logits, in float64, to round-off.

Where TRL's convention differs from minidpo's it is named in a test that shows both numbers:
- sigmoid ignores label_smoothing in TRL (cDPO is minidpo's sigmoid with label_smoothing);
- TRL's exo_pair makes eps a float32 tensor: its log-constants are float32 even in float64;
- TRL's bco_pair keeps no running reward mean (minidpo's reward_mean = 0);
- f-DPO on ipo / sigmoid_norm: TRL applies f' to the summed log-ratio and divides by the length,
  minidpo applies it to the per-token mean log-ratio (the row's log-prob rule);
- f-DPO's alpha: TRL's f_alpha_divergence_coef is 1 - alpha of the f-DPO paper (and of minidpo);
  TRL's alpha-divergence has no float64 clamp (a KeyError in float64);
- the NLL terms (sft, CPO, ORPO): TRL takes one token mean over the batch, minidpo the mean of each
  response's per-token NLL (equal when the chosen responses have equal lengths); TRL's ORPO counts
  the prompt's tokens in its NLL too, and computes the odds ratio in float32.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl", reason="needs trl (the crosscheck extra: pip install -e '.[crosscheck]')")

from minidpo.logprobs import sequence_logps, sequence_logps_backward  # noqa: E402
from minidpo.losses import (  # noqa: E402
    dpo_loss,
    f_divergence_score,
    kto_loss,
    kto_mismatched,
    kto_reference_point,
    ld_logps,
    wpo_weights,
)

N, T = 4, 9  # pairs; sequence length (prompt + completion), so T - 1 scored positions


def test_trl_is_1_x():
    assert trl.__version__.split(".")[0] == "1", trl.__version__


# ---------------------------------------------------------------------------------------------- stand-ins


class Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x


class TokenLogpModel(torch.nn.Module):
    """Stands in for a causal LM with TRL's fused LM head: returns the given per-token log-probs
    (B, T-1), zero where not scored, as ``log_probs`` (and the other fused outputs TRL logs)."""

    def __init__(self, token_logps, log_sum_sq=None, by_input=None):
        super().__init__()
        self.token_logps, self.log_sum_sq, self.by_input = token_logps, log_sum_sq, by_input or {}
        self.is_gradient_checkpointing = False

    def forward(self, input_ids=None, attention_mask=None, labels=None, fused_lm_head=False, use_cache=None, **kw):
        lp = self.by_input.get(id(input_ids), self.token_logps)
        zeros = torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                               log_sum_sq_probs=self.log_sum_sq if self.log_sum_sq is not None else zeros, aux_loss=None)


class LogitsModel(torch.nn.Module):
    """Stands in for a causal LM returning given logits (B, T, V)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids=None, attention_mask=None, use_cache=None, **kw):
        return SimpleNamespace(logits=self.logits, aux_loss=None)


def _trainer(cls, **settings):
    """A TRL trainer object without its __init__ (no model loading, no dataset): the settings its loss
    step reads, and the bookkeeping it writes metrics to."""
    t = cls.__new__(cls)
    base = dict(accelerator=Accelerator(), aux_loss_enabled=False, _metrics={"train": defaultdict(list),
                "eval": defaultdict(list)}, _tp_size=1, _total_train_tokens=0, is_encoder_decoder=False,
                pad_token_id=0, args=SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05))
    for k, v in {**base, **settings}.items():
        object.__setattr__(t, k, v)
    return t


def _masks(rng, n, lengths=None):
    """completion_mask (2n, T) (prompt tokens first, then the completion) and its shifted (2n, T-1) form."""
    if lengths is None:
        lengths = rng.integers(1, T - 2, 2 * n)
    cm = np.zeros((2 * n, T), dtype=np.int64)
    for b, k in enumerate(lengths):
        start = int(rng.integers(1, T - k + 1))  # at least one prompt token
        cm[b, start:start + k] = 1
    return cm, cm[:, 1:].astype(bool)


def _token_logps(rng, shift_mask, lo=-3.0):
    return np.where(shift_mask, rng.uniform(lo, -0.01, shift_mask.shape), 0.0)


def _dpo_trl(loss_type, token_logps, ref_token_logps, cm, weights=None, dtype=torch.float64, precompute=True,
             log_sum_sq=None, **settings):
    """TRL's DPO loss step: (loss, d loss / d per-token log-probs (2N, T-1)), autograd through TRL."""
    from trl.trainer.dpo_trainer import DPOTrainer

    lp = torch.tensor(token_logps, dtype=dtype, requires_grad=True)
    lss = None if log_sum_sq is None else torch.tensor(log_sum_sq, dtype=dtype)
    model = TokenLogpModel(lp, lss)
    ref_lp = torch.tensor(ref_token_logps, dtype=dtype)
    n = cm.shape[0] // 2
    inputs = {"input_ids": torch.ones(cm.shape, dtype=torch.long), "attention_mask": torch.ones(cm.shape, dtype=torch.long),
              "completion_mask": torch.tensor(cm)}
    if precompute:  # the reference's summed log-probs, as TRL's precompute_ref_log_probs caches them
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref_lp.sum(1)[:n], ref_lp.sum(1)[n:]
    types = loss_type if isinstance(loss_type, list) else [loss_type]
    defaults = dict(beta=0.3, loss_types=types, loss_weights=weights or [1.0] * len(types), ld_alpha=None,
                    f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, label_smoothing=0.0,
                    use_weighting=False, precompute_ref_logps=precompute, model=model,
                    ref_model=TokenLogpModel(ref_lp), router_aux_loss_coef=0.0)
    args = SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=settings.pop("discopop_tau", 0.05))
    trainer = _trainer(DPOTrainer, **{**defaults, **settings, "args": args})
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    loss.backward()
    return float(loss.detach()), lp.grad.numpy()


def _dpo_minidpo(loss_type, token_logps, ref_token_logps, shift_mask, per_token=False, beta=0.3, ld_alpha=None,
                 pair_weights=None, **options):
    """minidpo on the same per-token log-probs: (mean loss, d loss / d per-token log-probs (2N, T-1))."""
    n = shift_mask.shape[0] // 2
    counts = shift_mask.sum(1).astype(np.float64)
    if ld_alpha is None:
        seq, ref, tw = token_logps.sum(1), ref_token_logps.sum(1), shift_mask.astype(np.float64)
    else:
        (seq, tw), (ref, _) = ld_logps(token_logps, shift_mask, n, ld_alpha), ld_logps(ref_token_logps, shift_mask, n, ld_alpha)
    if per_token:  # the row's per-token mean log-probs
        seq, ref, tw = seq / counts, ref / counts, tw / counts[:, None]
    out = dpo_loss(seq[:n], seq[n:], ref[:n], ref[n:], beta=beta, loss_type=loss_type, pair_weights=pair_weights,
                   chosen_token_counts=np.ones(n) if per_token else counts[:n], **options)
    dseq = np.concatenate([out.grad_policy_chosen_logps, out.grad_policy_rejected_logps])
    return float(np.mean(out.losses)), dseq[:, None] * tw


def _close(trl_out, mine, shift_mask, rtol=1e-11, atol=1e-13):
    (l1, g1), (l2, g2) = trl_out, mine
    assert l1 == pytest.approx(l2, rel=rtol, abs=atol)
    np.testing.assert_allclose(np.where(shift_mask, g1, 0.0), g2, rtol=rtol * 10, atol=atol)


def _data(seed, lengths=None):
    rng = np.random.default_rng(seed)
    cm, sm = _masks(rng, N, lengths)
    return cm, sm, _token_logps(rng, sm), _token_logps(rng, sm)


# ---------------------------------------------------------------------------------------------- DPOTrainer's losses

# TRL loss_type -> (minidpo loss, its options, TRL settings, per-token log-probs)
DPO_FAMILY = {
    "sigmoid": ("sigmoid", {}, {}, False),
    "hinge": ("hinge", {}, {}, False),
    "ipo": ("ipo", {}, {}, True),
    "exo_pair": ("exo_pair", {"label_smoothing": 0.05}, {"label_smoothing": 0.05}, False),
    "nca_pair": ("nca_pair", {}, {}, False),
    "robust": ("robust", {"label_smoothing": 0.2}, {"label_smoothing": 0.2}, False),
    "bco_pair": ("bco_pair", {}, {}, False),
    "sppo_hard": ("sppo_hard", {}, {}, False),
    "aot": ("aot", {"label_smoothing": 0.1}, {"label_smoothing": 0.1}, False),
    "aot_unpaired": ("aot_unpaired", {"label_smoothing": 0.1}, {"label_smoothing": 0.1}, False),
    "apo_zero": ("apo_zero", {}, {}, False),
    "apo_down": ("apo_down", {}, {}, False),
    "discopop": ("discopop", {"tau": 0.3}, {"discopop_tau": 0.3}, False),
    "sigmoid_norm": ("sigmoid_norm", {}, {}, True),
}


# TRL's exo_pair makes eps a float32 tensor (torch.tensor(label_smoothing)), so its constants log(1 - eps)
# and log(eps) carry float32 round-off even in a float64 step: agreement to that, not to float64's
RTOL = {"exo_pair": 5e-7}


@pytest.mark.parametrize("trl_type", list(DPO_FAMILY))
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_trainer_losses(trl_type, seed):
    name, options, settings, per_token = DPO_FAMILY[trl_type]
    cm, sm, lp, ref = _data(seed)
    _close(_dpo_trl(trl_type, lp, ref, cm, **settings), _dpo_minidpo(name, lp, ref, sm, per_token, **options), sm,
           rtol=RTOL.get(trl_type, 1e-11))


def test_convention_trl_exo_constants_are_float32():
    """The float32 eps above, shown: TRL's float64 EXO loss equals EXO with log(1 - eps) and log(eps)
    rounded to float32, to float64 round-off."""
    cm, sm, lp, ref = _data(0)
    got, _ = _dpo_trl("exo_pair", lp, ref, cm, label_smoothing=0.05)
    h = (lp[:N].sum(1) - ref[:N].sum(1)) - (lp[N:].sum(1) - ref[N:].sum(1))
    z = 0.3 * h
    eps32 = np.float32(0.05)
    log_pw, log_pl = float(np.log1p(-eps32)), float(np.log(eps32))
    q_w, q_l = 1 / (1 + np.exp(-z)), 1 / (1 + np.exp(z))
    want = np.mean(q_w * (-np.logaddexp(0, -z) - log_pw) + q_l * (-np.logaddexp(0, z) - log_pl))
    assert got == pytest.approx(want, rel=1e-13)


def test_sft_and_a_weighted_sum_with_equal_chosen_lengths():
    """TRL's sft (and MPO's weighted sum of sigmoid, bco_pair, sft) equals minidpo's when the chosen
    responses have one length (the two NLL conventions then coincide: see the next test)."""
    lengths = [4, 4, 4, 4, 2, 5, 3, 6]
    cm, sm, lp, ref = _data(3, lengths)
    _close(_dpo_trl("sft", lp, ref, cm), _dpo_minidpo("sft", lp, ref, sm), sm)
    weights = {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}
    _close(_dpo_trl(list(weights), lp, ref, cm, weights=list(weights.values())),
           _dpo_minidpo("weighted_sum", lp, ref, sm, loss_weights=weights), sm)


def test_convention_nll_token_mean_over_the_batch_vs_per_response():
    """TRL's NLL: sum of the chosen tokens' NLL / all chosen tokens of the batch. minidpo's: the mean
    over pairs of each response's per-token NLL. With unequal lengths they differ; each is its formula."""
    lengths = [1, 6, 2, 5, 3, 3, 3, 3]
    cm, sm, lp, ref = _data(4, lengths)
    got, _ = _dpo_trl("sft", lp, ref, cm)
    chosen = lp[:N].sum(1)
    counts = sm[:N].sum(1)
    assert got == pytest.approx(-chosen.sum() / counts.sum(), rel=1e-13)  # TRL: one token mean
    mine, _ = _dpo_minidpo("sft", lp, ref, sm)
    assert mine == pytest.approx(np.mean(-chosen / counts), rel=1e-13)  # minidpo: per response, then per pair
    assert abs(got - mine) > 1e-3


def test_convention_trl_sigmoid_ignores_label_smoothing():
    """TRL's sigmoid loss reads no label_smoothing: with 0.2 it is still eq. 7, not cDPO(0.2)."""
    cm, sm, lp, ref = _data(5)
    trl_out = _dpo_trl("sigmoid", lp, ref, cm, label_smoothing=0.2)
    _close(trl_out, _dpo_minidpo("sigmoid", lp, ref, sm), sm)
    assert abs(trl_out[0] - _dpo_minidpo("sigmoid", lp, ref, sm, label_smoothing=0.2)[0]) > 1e-3


def test_convention_trl_bco_pair_has_no_running_mean():
    """TRL 1.16's bco_pair is BCO with delta = 0; minidpo's reward_mean input is BCO's running mean."""
    cm, sm, lp, ref = _data(6)
    trl_out = _dpo_trl("bco_pair", lp, ref, cm)
    moved = dpo_loss(lp[:N].sum(1), lp[N:].sum(1), ref[:N].sum(1), ref[N:].sum(1), beta=0.3, loss_type="bco_pair",
                     loss_inputs={"reward_mean": 0.3})
    assert abs(trl_out[0] - float(np.mean(moved.losses))) > 1e-3


# ---------------------------------------------------------------------------------------------- f-DPO

F_LOSSES = ["sigmoid", "hinge", "robust", "exo_pair", "discopop"]


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence"])
@pytest.mark.parametrize("trl_type", F_LOSSES)
def test_f_divergence_matches_trl(trl_type, divergence):
    name, options, settings, per_token = DPO_FAMILY[trl_type]
    cm, sm, lp, ref = _data(7)
    _close(_dpo_trl(trl_type, lp, ref, cm, f_divergence_type=divergence, **settings),
           _dpo_minidpo(name, lp, ref, sm, per_token, f_divergence=divergence, **options), sm,
           rtol=RTOL.get(trl_type, 1e-10))


@pytest.mark.parametrize("trl_type", ["sigmoid", "hinge"])
def test_alpha_divergence_in_float32_with_trls_coefficient(trl_type):
    """TRL's alpha-divergence runs in float32 (its clamp table has no float64) and its coefficient is
    1 - alpha of the f-DPO paper, which minidpo's f_alpha follows: TRL coef 0.3 = minidpo alpha 0.7."""
    cm, sm, lp, ref = _data(8)
    got = _dpo_trl(trl_type, lp, ref, cm, dtype=torch.float32, f_divergence_type="alpha_divergence",
                   f_alpha_divergence_coef=0.3)
    mine = _dpo_minidpo(trl_type, lp, ref, sm, f_divergence="alpha_divergence", f_alpha=0.7)
    _close(got, mine, sm, rtol=2e-6, atol=2e-7)
    other = _dpo_minidpo(trl_type, lp, ref, sm, f_divergence="alpha_divergence", f_alpha=0.3)
    assert abs(got[0] - other[0]) > 1e-3  # the same number means another alpha
    with pytest.raises(KeyError):  # TRL in float64
        _dpo_trl(trl_type, lp, ref, cm, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)


@pytest.mark.parametrize("trl_type", ["ipo", "sigmoid_norm"])
def test_convention_f_divergence_on_per_token_losses(trl_type):
    """TRL: f'(summed log-ratio) / length. minidpo: f'(per-token mean log-ratio) (its log-prob rule
    applied first). The same for reverse KL (linear); for js they differ, and TRL's is its formula."""
    cm, sm, lp, ref = _data(9)
    got, _ = _dpo_trl(trl_type, lp, ref, cm, f_divergence_type="js_divergence")
    counts = sm.sum(1)
    c = (lp.sum(1) - ref.sum(1))
    s = f_divergence_score(c, "js_divergence")[0] / counts
    h = s[:N] - s[N:]
    trl_formula = np.mean((h - 1 / (2 * 0.3)) ** 2) if trl_type == "ipo" else np.mean(np.logaddexp(0, -0.3 * h))
    assert got == pytest.approx(trl_formula, rel=1e-12)
    mine, _ = _dpo_minidpo(trl_type, lp, ref, sm, per_token=True, f_divergence="js_divergence")
    assert abs(got - mine) > 1e-3


# ---------------------------------------------------------------------------------------------- LD-DPO, WPO


@pytest.mark.parametrize("ld_alpha", [0.0, 0.4])
def test_ld_dpo_log_probs_match_trl(ld_alpha):
    """TRL's ld_alpha, the policy's and the reference's (its reference forward, not a precomputed cache)."""
    cm, sm, lp, ref = _data(10)
    got = _dpo_trl("sigmoid", lp, ref, cm, precompute=False, ld_alpha=ld_alpha)
    _close(got, _dpo_minidpo("sigmoid", lp, ref, sm, ld_alpha=ld_alpha), sm)


@pytest.mark.parametrize("trl_type", ["sigmoid", "apo_zero", "ipo"])
def test_wpo_weights_match_trl(trl_type):
    """TRL's use_weighting: each pair's loss times w(y_w) w(y_l) from the policy's log-probs and log
    sum_v p_v^2 (detached); minidpo's wpo_weights and dpo_loss(pair_weights=...)."""
    name, options, settings, per_token = DPO_FAMILY[trl_type]
    cm, sm, lp, ref = _data(11)
    lss = np.where(sm, np.random.default_rng(12).uniform(-2.0, -0.1, sm.shape), 0.0)
    got = _dpo_trl(trl_type, lp, ref, cm, use_weighting=True, log_sum_sq=lss, **settings)
    w = wpo_weights(lp, lss, sm, N)
    _close(got, _dpo_minidpo(name, lp, ref, sm, per_token, pair_weights=w, **options), sm)


# ---------------------------------------------------------------------------------------------- KTO


@pytest.mark.parametrize("seed,kl_shift", [(0, 0.8), (1, -0.8)], ids=["z0>0", "z0=0"])
def test_kto_matches_trl(seed, kl_shift):
    """KTOTrainer's loss step on unpaired examples, the reference point from the batch's mismatched
    completions (TRL's KL completions: the batch rotated by one, minidpo.losses.kto_mismatched), the
    reference log-probs precomputed. z0 is clamped at 0 (second case)."""
    from trl.trainer.kto_trainer import KTOTrainer

    rng = np.random.default_rng(seed)
    m = 6
    labels = np.array([True, False, True, True, False, False])
    cm = np.zeros((m, T), dtype=np.int64)
    kl_cm = np.zeros((m, T), dtype=np.int64)
    for b in range(m):
        k = int(rng.integers(1, 6))
        cm[b, T - k:] = 1
        kl_cm[b, T - int(rng.integers(1, 6)):] = 1
    sm, kl_sm = cm[:, 1:].astype(bool), kl_cm[:, 1:].astype(bool)
    lp, kl_lp = _token_logps(rng, sm), _token_logps(rng, kl_sm)
    ref_seq = lp.sum(1) + rng.normal(0, 1.0, m)
    ref_kl = kl_lp.sum(1) - kl_shift + rng.normal(0, 0.1, m)

    t_lp = torch.tensor(lp, requires_grad=True)
    ids, kl_ids = torch.ones((m, T), dtype=torch.long), torch.ones((m, T), dtype=torch.long)
    model = TokenLogpModel(t_lp, by_input={id(kl_ids): torch.tensor(kl_lp)})
    batch = {"input_ids": ids, "attention_mask": torch.ones((m, T), dtype=torch.long), "completion_mask": torch.tensor(cm),
             "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones((m, T), dtype=torch.long),
             "KL_completion_mask": torch.tensor(kl_cm), "label": torch.tensor(labels),
             "ref_logps": torch.tensor(ref_seq), "ref_KL_logps": torch.tensor(ref_kl)}
    trainer = _trainer(KTOTrainer, beta=0.2, desirable_weight=1.2, undesirable_weight=0.9, loss_type="kto",
                       calculate_KL=True, precompute_ref_logps=True, model=model)
    loss = KTOTrainer._compute_loss(trainer, model, batch, return_outputs=False)
    loss.backward()

    z0 = kto_reference_point(kl_lp.sum(1), ref_kl)
    assert (float(z0) > 0) == (kl_shift > 0)
    losses, d = kto_loss(lp.sum(1) - ref_seq, labels, 0.2, z0, 1.2, 0.9)
    assert float(loss.detach()) == pytest.approx(float(np.mean(losses)), rel=1e-12)
    np.testing.assert_allclose(np.where(sm, t_lp.grad.numpy(), 0.0), (d / m)[:, None] * sm, rtol=1e-10, atol=1e-15)
    # TRL's mismatch: KL_completion_ids = [completion_ids[-1]] + completion_ids[:-1], i.e. kto_mismatched
    completions = list(range(m))
    assert [completions[-1]] + completions[:-1] == list(kto_mismatched(m))


# ---------------------------------------------------------------------------------------------- CPO, SimPO, AlphaPO


def _cpo_trainer(**settings):
    from trl.experimental.cpo import CPOTrainer

    defaults = dict(beta=0.3, label_smoothing=0.0, loss_type="sigmoid", alpha=0.0, simpo_gamma=0.5, cpo_alpha=0.0)
    return CPOTrainer, _trainer(CPOTrainer, **{**defaults, **settings})


@pytest.mark.parametrize("case", ["cpo", "simpo", "alphapo", "alphapo-negative"])
def test_cpo_loss_with_log_probs_supplied(case):
    """CPOTrainer.cpo_loss on given log-probs (summed for CPO, per-token means for SimPO and AlphaPO)."""
    settings, name, options = {
        "cpo": (dict(loss_type="sigmoid"), "cpo", {"nll_weight": 0.0}),
        "simpo": (dict(loss_type="simpo", simpo_gamma=0.7), "simpo", {"gamma": 0.7}),
        "alphapo": (dict(loss_type="simpo", alpha=0.25, simpo_gamma=0.5), "alphapo", {"alpha": 0.25, "gamma": 0.5}),
        "alphapo-negative": (dict(loss_type="simpo", alpha=-0.5, simpo_gamma=0.2), "alphapo", {"alpha": -0.5, "gamma": 0.2}),
    }[case]
    cls, trainer = _cpo_trainer(**settings)
    rng = np.random.default_rng(13)
    a = rng.uniform(-30, -2, (2, N)) if name == "cpo" else rng.uniform(-4, -0.05, (2, N))
    pw, pl = torch.tensor(a[0], requires_grad=True), torch.tensor(a[1], requires_grad=True)
    losses, _, _ = cls.cpo_loss(trainer, pw, pl)
    losses.mean().backward()
    out = dpo_loss(a[0], a[1], None, None, beta=0.3, loss_type=name, chosen_token_counts=np.ones(N), **options)
    np.testing.assert_allclose(losses.detach().numpy(), out.losses, rtol=1e-12)
    np.testing.assert_allclose(pw.grad.numpy(), out.grad_policy_chosen_logps, rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(pl.grad.numpy(), out.grad_policy_rejected_logps, rtol=1e-11, atol=1e-15)


def _logits_batch(rng, prompt_lens, chosen_lens, rejected_lens, V=7):
    """TRL's paired batch (chosen_*/rejected_* input ids, attention masks, labels with the prompt at -100),
    all of one width, and logits for the 2N concatenated rows."""
    width = max(p + max(c, r) for p, c, r in zip(prompt_lens, chosen_lens, rejected_lens))
    batch = {}
    for side, lens in (("chosen", chosen_lens), ("rejected", rejected_lens)):
        ids = np.zeros((N, width), dtype=np.int64)
        att = np.zeros((N, width), dtype=np.int64)
        lab = np.full((N, width), -100, dtype=np.int64)
        for b in range(N):
            p, k = prompt_lens[b], lens[b]
            ids[b, :p + k] = rng.integers(1, V, p + k)
            att[b, :p + k] = 1
            lab[b, p:p + k] = ids[b, p:p + k]
        batch.update({f"{side}_input_ids": torch.tensor(ids), f"{side}_attention_mask": torch.tensor(att),
                      f"{side}_labels": torch.tensor(lab)})
    logits = rng.normal(0, 1.5, (2 * N, width, V))
    return batch, logits


def _dense_logps(logits, ids, mask, average=False):
    """log pi(y|x) of right-padded rows from full (B, T, V) logits, the label at t scored by the logits
    at t - 1 where mask[:, t] (packing.padded_batch's convention), and a backward giving (B, T, V):
    (logps (B,), token counts (B,), backward(dlogps) -> dlogits)."""
    from minidpo.packing import padded_batch

    b = padded_batch(ids, mask, average=average)
    B, T, V = logits.shape
    rows = logits.reshape(-1, V)[b.logits_at]  # (M, V)
    logps, cache = sequence_logps(rows, b.labels, b.weights(logits.dtype))

    def backward(dlogps):
        out = np.zeros_like(logits).reshape(-1, V)
        np.add.at(out, b.logits_at, sequence_logps_backward(dlogps, cache))
        return out.reshape(B, T, V)

    return logps, b.host_token_counts, backward


def _minidpo_from_logits(batch, logits, name, average, beta=0.3, **options):
    """minidpo on TRL's batch: sequence_logps of the concatenated rows, the loss, and its gradient
    carried back to the logits by sequence_logps_backward."""
    ids = np.concatenate([batch["chosen_input_ids"].numpy(), batch["rejected_input_ids"].numpy()])
    labels = np.concatenate([batch["chosen_labels"].numpy(), batch["rejected_labels"].numpy()])
    mask = labels != -100
    logps, counts, backward = _dense_logps(logits, ids, mask, average)
    counts = counts[:N]
    out = dpo_loss(logps[:N], logps[N:], None, None, beta=beta, loss_type=name,
                   chosen_token_counts=np.ones(N) if average else counts, **options)
    dlogits = backward(np.concatenate([out.grad_policy_chosen_logps, out.grad_policy_rejected_logps]))
    return float(np.mean(out.losses)), dlogits


@pytest.mark.parametrize("case", ["cpo", "simpo"])
def test_cpo_trainer_step_from_logits(case):
    """CPOTrainer.get_batch_loss_metrics: TRL's own log-probs (summed for CPO, per-token for SimPO) and
    its NLL (cpo_alpha 1 for CPO) from the logits; chosen responses of one length (NLL conventions agree)."""
    rng = np.random.default_rng(14)
    batch, logits = _logits_batch(rng, [2, 3, 1, 2], [4, 4, 4, 4], [2, 5, 3, 1])
    settings, name, average, options = {
        "cpo": (dict(loss_type="sigmoid", cpo_alpha=1.0), "cpo", False, {"nll_weight": 1.0}),
        "simpo": (dict(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.5), "simpo", True, {"gamma": 0.5}),
    }[case]
    cls, trainer = _cpo_trainer(**settings)
    t_logits = torch.tensor(logits, requires_grad=True)
    loss, _ = cls.get_batch_loss_metrics(trainer, LogitsModel(t_logits), batch)
    loss.backward()
    mine, dlogits = _minidpo_from_logits(batch, logits, name, average, **options)
    assert float(loss.detach()) == pytest.approx(mine, rel=1e-12)
    np.testing.assert_allclose(t_logits.grad.numpy(), dlogits, rtol=1e-9, atol=1e-14)


# ---------------------------------------------------------------------------------------------- ORPO


def test_orpo_odds_ratio_with_log_probs_supplied():
    """ORPOTrainer.odds_ratio_loss casts the log-probs to float32 whatever they were: it agrees with
    minidpo's float64 odds-ratio term to float32 round-off, and with minidpo in float32 closely."""
    from trl.experimental.orpo import ORPOTrainer

    trainer = _trainer(ORPOTrainer, beta=0.1)
    rng = np.random.default_rng(15)
    a = rng.uniform(-4, -0.05, (2, N))
    pw, pl = torch.tensor(a[0], requires_grad=True), torch.tensor(a[1], requires_grad=True)
    losses, *_ = ORPOTrainer.odds_ratio_loss(trainer, pw, pl)
    assert losses.dtype == torch.float32  # TRL's cast
    (-losses.mean()).backward()  # TRL's loss is NLL - mean(losses)
    out = dpo_loss(a[0], a[1], None, None, beta=0.1, loss_type="orpo", nll_weight=0.0)
    np.testing.assert_allclose(-losses.detach().numpy(), out.losses, rtol=2e-6)
    np.testing.assert_allclose(pw.grad.numpy(), out.grad_policy_chosen_logps, rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(pl.grad.numpy(), out.grad_policy_rejected_logps, rtol=2e-5, atol=1e-9)


def test_orpo_trainer_step_counts_the_prompt_in_its_nll():
    """ORPOTrainer.get_batch_loss_metrics from logits: TRL's odds-ratio term is minidpo's (per-token
    means, float32 in TRL); TRL's NLL is the token mean over the chosen rows' prompt AND response tokens,
    where minidpo's (and the ORPO paper's L_SFT) scores the response. Both are shown."""
    from trl.experimental.orpo import ORPOTrainer

    rng = np.random.default_rng(16)
    batch, logits = _logits_batch(rng, [2, 3, 1, 2], [4, 4, 4, 4], [2, 5, 3, 1])
    trainer = _trainer(ORPOTrainer, beta=0.1, padding_value=0)
    t_logits = torch.tensor(logits, requires_grad=True)
    loss, _ = ORPOTrainer.get_batch_loss_metrics(trainer, LogitsModel(t_logits), batch)
    loss.backward()
    odds, d_odds = _minidpo_from_logits(batch, logits, "orpo", True, beta=0.1, nll_weight=0.0)
    # TRL's NLL: every chosen token after the first, prompt included, one mean over the batch
    ids = batch["chosen_input_ids"].numpy()
    full = batch["chosen_attention_mask"].numpy().astype(bool)
    full[:, 0] = False
    lp_full, _, back_full = _dense_logps(logits[:N], ids, full)
    nll_trl = -lp_full.sum() / full.sum()
    assert float(loss.detach()) == pytest.approx(odds + nll_trl, rel=2e-6)
    d_nll = back_full(np.full(N, -1.0 / full.sum()))
    want = d_odds.copy()
    want[:N] += d_nll
    np.testing.assert_allclose(t_logits.grad.numpy(), want, rtol=2e-5, atol=1e-8)
    mine, _ = _minidpo_from_logits(batch, logits, "orpo", True, beta=0.1)  # minidpo's own NLL: the response only
    assert abs(mine - float(loss.detach())) > 1e-2
