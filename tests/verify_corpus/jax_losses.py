"""DPO losses in JAX (checked when jax is installed)."""

import jax
import jax.numpy as jnp

from tests.verify_corpus import Case


def _h(pw, pl, rw, rl):
    return (pw - rw) - (pl - rl)


def dpo(pw, pl, rw, rl, beta):
    rw, rl = jax.lax.stop_gradient(rw), jax.lax.stop_gradient(rl)
    losses = -jax.nn.log_sigmoid(beta * _h(pw, pl, rw, rl))
    return losses, jax.lax.stop_gradient(beta * (pw - rw)), jax.lax.stop_gradient(beta * (pl - rl))


def cdpo(pw, pl, rw, rl, beta, label_smoothing=0.0):
    z = beta * _h(pw, pl, rw, rl)
    return jnp.mean(-(1 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z))


def ipo(pw, pl, rw, rl, beta):
    return (_h(pw, pl, rw, rl) - 1 / (2 * beta)) ** 2


CORRECT = [Case(dpo), Case(dpo, check=dict(require_detached_reference=True)), Case(cdpo, "cdpo"), Case(ipo, "ipo")]


def rewards_not_stopped(pw, pl, rw, rl, beta):
    return -jax.nn.log_sigmoid(beta * _h(pw, pl, rw, rl)), beta * (pw - rw), beta * (pl - rl)


def naive_log_sigmoid(pw, pl, rw, rl, beta):
    return -jnp.log(jax.nn.sigmoid(beta * _h(pw, pl, rw, rl)))


def cdpo_sign_flip(pw, pl, rw, rl, beta, label_smoothing=0.0):
    z = beta * _h(pw, pl, rw, rl)
    return -(1 - label_smoothing) * jax.nn.log_sigmoid(z) + label_smoothing * jax.nn.log_sigmoid(-z)


def beta_twice(pw, pl, rw, rl, beta):
    return -jax.nn.log_sigmoid(beta * beta * _h(pw, pl, rw, rl))


def reference_not_stopped(pw, pl, rw, rl, beta):
    return -jax.nn.log_sigmoid(beta * _h(pw, pl, rw, rl))


BROKEN = [
    Case(rewards_not_stopped, "dpo", "rewards (eq. 8)", bug="rewards carry gradient"),
    Case(naive_log_sigmoid, "dpo", "numerics (large margins, dtypes)", bug="log(sigmoid(z)) at large margins"),
    Case(cdpo_sign_flip, "cdpo", "cDPO: label-mixture law", bug="sign flip in cDPO's label-smoothed term"),
    Case(beta_twice, "dpo", "beta only through beta*h", bug="beta applied twice"),
    Case(reference_not_stopped, "dpo", "reference gets no gradient", check=dict(require_detached_reference=True),
         bug="reference receives gradient (strict check)"),
]
