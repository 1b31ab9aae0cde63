"""Every loss of the family through one real DPO training step of the model (train.dpo_step on a
collate_preferences batch, float64): the step's loss equals the paper's formula
(tests/verify_corpus/family_losses.py, written apart from minidpo.losses) on log-probs from a
separate forward, and the gradient of the whole network matches central differences of that formula
along a random direction.

A loss without a reference gets None for pi_ref (nothing to compute). KTO's reference point is
supplied the way the trainer will supply it, per batch: here through dpo_step_loss's ``inputs``.
(The step is called as ``dpo_step(params, config, batch, ref_chosen, ref_rejected, tc, inputs)``.)
"""

import numpy as np
import pytest

import minidpo.train as T
from minidpo.data import TokenizedPair, collate_preferences
from minidpo.logprobs import sequence_logps
from minidpo.losses import LOSS_TABLE, dpo_step_loss
from minidpo.model import GPTConfig, gpt_forward, init_params
from tests.verify_corpus import family_losses as paper

CFG = GPTConfig(vocab_size=23, n_ctx=16, n_layer=2, n_head=2, n_embd=8)
N = 5
STEP = T.dpo_step  # (params, config, batch, ref_chosen, ref_rejected, tc, inputs) -> (loss, metrics, grads)
Z0 = 0.15  # KTO's reference point for the batch

# loss -> (the paper's formula, TrainConfig fields, whether the formula takes token counts)
FORMULAS = {
    "exo_pair": (paper.exo_pair, {}, False), "nca_pair": (paper.nca_pair, {}, False),
    "bco_pair": (paper.bco_pair, {}, False), "sppo_hard": (paper.sppo_hard, {}, False),
    "aot": (paper.aot, {"loss_options": {"label_smoothing": 0.1}}, False),
    "aot_unpaired": (paper.aot_unpaired, {"loss_options": {"label_smoothing": 0.1}}, False),
    "apo_zero": (paper.apo_zero, {}, False), "apo_down": (paper.apo_down, {}, False),
    "discopop": (paper.discopop, {"loss_options": {"tau": 0.5}}, False),
    "sigmoid_norm": (None, {}, False), "sft": (paper.sft, {}, True), "weighted_sum": (paper.mpo, {}, True),
    "simpo": (paper.simpo, {}, False), "cpo": (paper.cpo, {}, True), "alphapo": (paper.alphapo, {}, False),
    "orpo": (paper.orpo, {}, True), "kto": (paper.kto, {}, False),
}


def random_pairs(n, seed):
    rng = np.random.default_rng(seed)
    ids = lambda k: [int(t) for t in rng.integers(1, CFG.vocab_size, k)]  # noqa: E731
    return [TokenizedPair(prompt_ids=ids(int(rng.integers(1, 4))), chosen_ids=ids(int(rng.integers(1, 6))),
                          rejected_ids=ids(int(rng.integers(1, 6)))) for _ in range(n)]


def logps_of(params, batch, average):
    """A separate forward's log pi(y|x) (sums, or per-token means) and the token counts, (2N,) each."""
    logits, _ = gpt_forward(params, batch.input_ids, CFG, batch.layout, logits_at=batch.logits_at)
    counts = batch.host_token_counts.astype(np.float64)
    w = batch.mean_weights(np.float64) * counts[:, None]  # each example's plain sum
    lp, _ = sequence_logps(logits, batch.labels, w / counts[:, None] if average else w)
    return lp, counts


def formula_loss(name, params, batch, ref, ref_sum, tc):
    fn, _, takes_counts = FORMULAS[name]
    lp, counts = logps_of(params, batch, tc.logps_averaged)
    pw, pl, rw, rl = lp[:N], lp[N:], ref[:N], ref[N:]
    kw = {}
    if name == "sigmoid_norm":  # its formula divides summed log-ratios by the counts itself
        s, c = logps_of(params, batch, False)
        return float(np.mean(paper.sigmoid_norm(s[:N], s[N:], ref_sum[:N], ref_sum[N:], tc.beta,
                                                chosen_token_counts=c[:N], rejected_token_counts=c[N:])))
    if takes_counts:
        kw["chosen_token_counts"] = np.ones(N) if tc.logps_averaged else counts[:N]
    if name == "kto":
        kw["reference_point"] = Z0
    kw.update({k: v for k, v in tc.loss_options.items() if k != "loss_weights"})
    return float(np.mean(fn(pw, pl, rw, rl, tc.beta, **kw)))



@pytest.mark.parametrize("name", list(FORMULAS))
def test_one_training_step_of_the_whole_network(name, monkeypatch):
    extra = FORMULAS[name][1]
    tc = T.TrainConfig(loss_type=name, beta=0.4, **extra)
    policy = init_params(CFG, seed=1, dtype=np.float64)
    reference = init_params(CFG, seed=2, dtype=np.float64)
    batch = collate_preferences(random_pairs(N, seed=3), pad_id=0, average=tc.logps_averaged)  # the loss's rule
    ref, _ = logps_of(reference, batch, tc.logps_averaged)
    ref_sum, _ = logps_of(reference, batch, False)
    row = LOSS_TABLE[name]
    ref_c, ref_r = (ref[:N], ref[N:]) if row.needs_reference(row.resolve(tc.loss_options)) else (None, None)
    inputs = {"reference_point": Z0} if name == "kto" else None  # the trainer's part: a constant of the step
    loss, metrics, grads = STEP({k: v.copy() for k, v in policy.items()}, CFG, batch, ref_c, ref_r, tc, inputs)
    if ref_c is None:  # what the formula sees for a loss without a reference: nothing (it reads pi only)
        ref = np.zeros(2 * N)
    f = lambda p: formula_loss(name, p, batch, ref, ref_sum, tc)  # noqa: E731
    assert float(loss) == pytest.approx(f(policy), rel=1e-10, abs=1e-12)
    rng = np.random.default_rng(4)
    d = {k: rng.standard_normal(v.shape) for k, v in policy.items()}
    def central(e):
        return (f({k: v + e * d[k] for k, v in policy.items()}) - f({k: v - e * d[k] for k, v in policy.items()})) / (2 * e)

    numeric = (4.0 * central(5e-6) - central(1e-5)) / 3.0  # one Richardson step: error O(e^4)
    analytic = sum(float(np.vdot(grads[k], d[k])) for k in policy)
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)
    assert abs(analytic) > 1e-6  # the direction moves the loss: the check can fail


def test_the_step_loss_with_an_input_is_the_held_out_loss():
    """Held-out evaluation runs dpo_step_loss too: KTO's reference point reaches it the same way."""
    rng = np.random.default_rng(5)
    tc = T.TrainConfig(loss_type="kto", beta=0.2)
    logps = rng.uniform(-20, -1, 2 * N)
    ref = rng.uniform(-20, -1, 2 * N)
    out, dlogps = dpo_step_loss(logps, np.arange(1, 2 * N + 1), ref[:N], ref[N:], tc, {"reference_point": 0.5})
    want = paper.kto(logps[:N], logps[N:], ref[:N], ref[N:], 0.2, reference_point=0.5)
    np.testing.assert_allclose(out.losses, want, rtol=1e-12)
    with pytest.raises(ValueError, match="needs reference_point"):
        dpo_step_loss(logps, np.arange(1, 2 * N + 1), ref[:N], ref[N:], tc)
