"""Statistical checks shared by the distribution tests (sampling, end-to-end decoding).

Import it from any test as `import stats` (tests/ has no __init__.py, so pytest's default
'prepend' import mode puts tests/ on sys.path).

Typical use: draw n samples of a discrete outcome, histogram them into `counts` (e.g.
`np.bincount(x, minlength=V)`, or `x0 * V + x1` for a joint law), compute the exact law
`probs`, then

    stats.assert_counts_match(counts, probs, "first token")   # in the positive test
    assert not stats.check_counts(counts, wrong_probs)         # in a negative control

A check passes when every cell is within `sigmas`·σ + `slack` of its expectation AND a Pearson
chi-square goodness-of-fit test gives p > `min_pvalue`. Negative controls (a deliberately broken
sampler must fail the same check) are what show that n is large enough for the check to mean
something: write one for every distribution test.

`decoding_law` gives the exact laws their logits processing (temperature, top-k, top-p) written
again in plain numpy, so a bug in `sampling.process_logits` cannot cancel out of the comparison.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaincc

from tidar_jax.decode.sampling import SamplingParams

# Cells whose expected count is below this are pooled into one cell for the chi-square test,
# where the chi-square approximation of Pearson's statistic breaks down.
MIN_EXPECTED = 5.0


@dataclasses.dataclass(frozen=True)
class CountCheck:
  """Outcome of `check_counts`; truthy iff the counts are consistent with the law."""

  ok: bool
  pvalue: float  # chi-square goodness-of-fit p-value (0 if an impossible cell was hit)
  worst_cell: int  # index of the cell with the largest |count - expected| / (sigmas·σ + slack)
  message: str

  def __bool__(self) -> bool:
    return self.ok


def chi2_sf(x: float, dof: int) -> float:
  """Chi-square survival function P(X >= x), X ~ chi2(dof), without a scipy dependency."""
  return float(gammaincc(jnp.float32(dof / 2.0), jnp.float32(x / 2.0)))


def check_counts(counts, probs, *, sigmas: float = 6.0, slack: float = 5.0,
                 min_pvalue: float = 1e-3) -> CountCheck:
  """Test observed counts [C] (n = their sum) against an exact law probs [C] (sums to 1)."""
  counts = np.asarray(counts, np.float64).ravel()
  probs = np.asarray(probs, np.float64).ravel()
  if counts.shape != probs.shape:
    raise ValueError(f"counts {counts.shape} and probs {probs.shape} must have the same size")
  if not np.isclose(probs.sum(), 1.0, atol=1e-6) or np.any(probs < 0):
    raise ValueError(f"probs must be a distribution, sums to {probs.sum()}")
  n = counts.sum()
  expected = n * probs
  sigma = np.sqrt(n * probs * (1.0 - probs))
  excess = np.abs(counts - expected) / (sigmas * sigma + slack)
  worst = int(np.argmax(excess))

  impossible = (probs == 0) & (counts > 0)
  if np.any(impossible):
    cells = np.flatnonzero(impossible)
    return CountCheck(False, 0.0, int(cells[0]),
                      f"cells {cells.tolist()} have probability 0 but counts {counts[cells].tolist()}")

  big = expected >= MIN_EXPECTED
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  keep = exp > 0
  obs, exp = obs[keep], exp[keep]
  chi2 = float(np.sum((obs - exp) ** 2 / exp))
  dof = max(len(exp) - 1, 1)
  pvalue = chi2_sf(chi2, dof)

  ok = bool(excess[worst] <= 1.0 and pvalue > min_pvalue)
  message = (f"n={int(n)} chi2={chi2:.1f} dof={dof} p={pvalue:.3g}; worst cell {worst}: "
             f"count {int(counts[worst])} vs expected {expected[worst]:.1f} "
             f"(±{sigmas:g}σ+{slack:g} = ±{sigmas * sigma[worst] + slack:.1f})")
  return CountCheck(ok, pvalue, worst, message)


def assert_counts_match(counts, probs, what: str = "counts", **kwargs) -> None:
  """`check_counts`, raising AssertionError with the details when the counts do not fit."""
  result = check_counts(counts, probs, **kwargs)
  assert result.ok, f"{what} do not follow the expected law: {result.message}"


def decoding_law(logits, sampling: SamplingParams) -> np.ndarray:
  """The law a decoder samples from raw logits [..., V] under `sampling` (not greedy), float64 [..., V].

  Written from the rule text, not from `sampling.process_logits`: divide by the temperature; keep a
  token iff fewer than top_k tokens have a larger logit; then, on the renormalised law, keep a token
  iff the tokens strictly more likely than it hold less than top_p (the smallest nucleus reaching
  top_p, ties at either boundary kept).
  """
  if sampling.greedy:
    raise ValueError("decoding_law is for sampling; greedy decoding is the argmax")
  x = np.asarray(logits, np.float64) / sampling.temperature  # [..., V]
  if sampling.top_k:
    beaten_by = np.sum(x[..., None, :] > x[..., :, None], axis=-1)  # [..., V]: larger logits per token
    x = np.where(beaten_by < sampling.top_k, x, -np.inf)
  probs = np.exp(x - x.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  if sampling.top_p < 1.0:
    more_likely = probs[..., None, :] > probs[..., :, None]  # [..., V, V]: [token, other]
    mass_above = np.sum(np.where(more_likely, probs[..., None, :], 0.0), axis=-1)  # [..., V]
    probs = np.where(mass_above < sampling.top_p, probs, 0.0)
    probs /= probs.sum(-1, keepdims=True)
  return probs
