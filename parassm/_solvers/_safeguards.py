"""The safeguards of the Newton loop's next trial: the converged prefix stays frozen,
the first unconverged step becomes `f` there, and a tail that blew up, stalled or
crawled is restarted as the solver's rules say (`_rules.py`)."""

from collections.abc import Callable

import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from ._measure import first_true
from ._rules import Rules


def safeguarded(
    S: Float[Array, "T D"],
    fs: Float[Array, "T D"],
    sizes: Float[Array, " T"],
    trial: Float[Array, "T D"],
    p: Array,
    blown: Array,
    stalled: Bool[Array, ""] | bool = False,
    crawled: Bool[Array, ""] | bool = False,
    lowers: Callable[[Float[Array, "T D"]], Bool[Array, ""]] | None = None,
    cond: Callable = lax.cond,
    rules: Rules = Rules(),
) -> Float[Array, "T D"]:
    """`trial` with the loop's safeguards: the converged prefix (before `p`) stays
    frozen, step `p` becomes exactly `f(s_{p-1}, x_p)` (the correction form would cancel
    catastrophically if the old guess there were huge), and the tail is restarted by
    the solver's rules:

    - `rules.blown_up` ([`parassm.RestartBlownUp`][]): from the first blown-up step on
      (`blown`, the first step whose scaled residual reaches the merit's cap, `T` if
      none; or where the trial is not finite or larger than `1 / sqrt(eps)` times every
      step of `S` and `f(S)` before `blown`, bounded by `sizes` from `measure`), the
      last sane step repeated, or the converged prefix in phase where it is periodic
      (`rules.in_phase`);
    - `rules.stall` ([`parassm.RestartOnStall`][]), where `stalled`;
    - `rules.at_rest` ([`parassm.RestartAtRest`][]), where `crawled` and `lowers` (one
      more evaluation of `f`) says the restart cuts the merit over the tail enough.

    Entries still not finite afterwards (only at `p`, where `f` itself is not) keep the
    iterate's values. Only unconverged steps change, so the front still advances at
    least one step.
    """
    T = S.shape[0]
    times = jnp.arange(T)[:, None]
    trial = jnp.where(times < p, S, jnp.where(times == p, fs, trial))
    no = jnp.array(False)
    if rules.stall is None:
        stalled = False
    at_rest_rule = rules.at_rest if lowers is not None and crawled is not False else None
    if rules.blown_up is None:
        blown = T
    else:
        # A trial step far larger than the sane part of the iterate is blown up too.
        # From the sizes of the steps (a pass over `T` numbers, not `T D`). A
        # non-finite trial step counts as huge, whatever the bound.
        size = jnp.max(jnp.where(times[:, 0] < blown, sizes, 0))
        bound = size / jnp.sqrt(jnp.finfo(S.dtype).eps)
        row = jnp.max(jnp.abs(trial), axis=1)
        huge = first_true(~((row <= bound) & jnp.isfinite(row)))
        blown = jnp.minimum(blown, huge)

    def unchanged(trial):
        if rules.blown_up is None:
            # Nothing restarts a blown-up tail: its non-finite entries, at least, go.
            return jnp.where(jnp.isfinite(trial), trial, S)
        return trial

    if stalled is False and at_rest_rule is None and rules.blown_up is None:
        return unchanged(trial)

    def rest():
        # The state at step `p` (exactly `f(s_{p-1})`), and whether the prefix is at
        # rest: its last `window` steps within `rest` of the size of the converged
        # prefix from it. Masked reductions: passes over `T D` numbers.
        window = at_rest_rule.window
        at_p = jnp.sum(jnp.where(times == p, fs, 0), axis=0)
        recent = (times >= p - window) & (times < p)
        moved = jnp.max(jnp.where(recent, jnp.abs(S - at_p[None, :]), 0))
        prefix_size = jnp.max(jnp.where(times[:, 0] < p, sizes, 0))
        return at_p, (p >= window) & (moved <= at_rest_rule.rest * prefix_size)

    at_p, at_rest = jnp.zeros(S.shape[1], S.dtype), no
    if at_rest_rule is not None:
        at_p, at_rest = cond(crawled & (blown >= T), rest, lambda: (at_p, no))

    def restart(trial):
        last = jnp.maximum(blown - 1, p)
        # The rows by masked reductions, not indexing (with time split over devices,
        # one all-reduce rather than a gather): the last sane step, and the rows of
        # the trial from `2n` steps before `p` to `n` after it, `window[j] =
        # s_{p - 2n + j}` (zero outside the sequence; before `p` the converged prefix).
        last_sane = jnp.sum(jnp.where(times == last, trial, 0), axis=0)
        n = rules.window
        # A scatter-add of the rows into their places (`O(T D)`; the rows outside the
        # window are dropped): a masked reduction over time, whose batched form is as
        # cheap (a one-hot product over `T x 3n` cost a batch of eight GRUs 3.4x its
        # single runs).
        offset = times[:, 0] - (p - 2 * n)
        place = jnp.where((offset >= 0) & (offset < 3 * n), offset, 3 * n)
        finite = jnp.where(jnp.isfinite(trial), trial, 0)
        window = jnp.zeros((3 * n, S.shape[1]), S.dtype).at[place].add(finite, mode="drop")
        prefix, ahead = window[: 2 * n], window[2 * n :]
        scale = jnp.max(jnp.abs(prefix)) + jnp.finfo(S.dtype).tiny
        # (A stall's repeats over at most an eighth of the sequence: a step of multiple
        # shooting's coarse problem is a whole chunk, and it has about sqrt(T) of them.)
        repeats = 1 if rules.stall is None else min(rules.stall.repeats, max(T // 8, 1))

        def deviations(w):
            # How far the last `2w`, and the last `max(2w, repeats)`, converged steps
            # are off the prefix's last `w` steps repeated backwards.
            i = jnp.arange(2 * n)
            rows = jnp.max(jnp.abs(prefix - prefix[2 * n - w + jnp.mod(i - 2 * n, w)]), axis=1)

            def over_last(m):
                return jnp.max(jnp.where(i >= 2 * n - m, rows, 0))

            return over_last(2 * w), over_last(jnp.maximum(2 * w, repeats))

        # The shortest period with which the converged prefix repeats: over its last two
        # periods after a blow-up, over at least `repeats` steps after a stall. The
        # tail repeats the last period, in phase (one gather from the window).
        periods = jnp.arange(1, n + 1)
        two, many = jax.vmap(deviations)(periods)
        fits = (p >= 2 * periods) & (2 * periods <= T)
        if rules.in_phase is None:
            found_blown = jnp.zeros(n, bool)
        else:
            found_blown = (
                fits & (periods <= rules.in_phase.max_period) & (two <= rules.in_phase.rtol * scale)
            )
        if rules.stall is None:
            found_stall = jnp.zeros(n, bool)
        else:
            found_stall = (
                fits
                & (periods <= rules.stall.max_period)
                & (p >= repeats)
                & (many <= rules.stall.rtol * scale)
            )
        found = jnp.where(blown < T, found_blown, found_stall)
        any_found = jnp.any(found)
        w = jnp.where(any_found, periods[jnp.argmax(found)], 1)
        extension = prefix[2 * n - w + (times[:, 0] - p) % w]
        follow = no
        if rules.stall is not None:
            # Stalled, nothing blown up: follow the period (one included) if the
            # trial's next steps are off it.
            k = jnp.arange(n)
            inside = (p + k < T)[:, None]
            off = jnp.abs(ahead - prefix[2 * n - w + k % w]) > rules.stall.mismatch * scale
            follow = stalled & (blown >= T) & any_found & jnp.any(inside & off)
        # Crawling at rest, not followed: the tail after `p` repeats step `p` if that
        # lowers the merit over it enough.
        lower = no
        if at_rest_rule is not None:
            lower = cond(
                at_rest & ~follow,
                lambda: lowers(jnp.where(times > p, at_p, trial), at_rest_rule.ratio),
                lambda: no,
            )
        # The tail after `last` (blown up) or after `p` (followed) repeats the period,
        # or after a blow-up without a period of two or more, the last sane step;
        # otherwise nothing changes.
        tail = jnp.where(any_found & ((w > 1) | follow), extension, last_sane)
        tail = jnp.where(lower, at_p, tail)
        start = jnp.where(follow | lower, p, jnp.where(blown < T, last, T))
        restarted = jnp.where(times > start, tail, trial)
        # Every step up to `last` is finite but `p` (`f` there): entrywise.
        return jnp.where(jnp.isfinite(restarted), restarted, S)

    # Nothing blown up, nothing crawling (the common case): every step is finite and
    # nothing changes, so the passes of the restart are skipped.
    return cond((blown < T) | stalled | at_rest, restart, unchanged, trial)
