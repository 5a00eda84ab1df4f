from jaxtyping import Array, Float

from ._scan_impl import AbstractScanImpl, as_scan_impl, default_scan_impl
from ._transitions import AbstractTransition, Zero


def solve(
    transition: AbstractTransition,
    b: Float[Array, "T D"],
    init: Float[Array, " D"] | None = None,
    *,
    reverse: bool = False,
    scan_impl: AbstractScanImpl | str | None = None,
) -> Float[Array, "T D"]:
    r"""Solve the linear recurrence $s_t = A_t s_{t-1} + b_t$ for all `t` at once.

    By default the recurrence is solved by `jax.lax.associative_scan` with the combine
    $(A_1, b_1) \circ (A_2, b_2) = (A_2 A_1, A_2 b_1 + b_2)$: depth $O(\log T)$, and
    work and memory set by the structure of `transition` (`O(T D^2)` memory for
    [`parassm.linear.Dense`][], `O(T D)` for [`parassm.linear.Diagonal`][]). `scan_impl`
    (or an enclosing [`parassm.linear.scan_impl`][] block) chooses another algorithm
    with the same result: [`parassm.linear.ChunkedScan`][] or
    [`parassm.linear.PallasScan`][].

    **Arguments:**

    - `transition`: the maps $A_1, \ldots, A_T$ (any
        [`parassm.linear.AbstractTransition`][]).
    - `b`: the offsets $b_1, \ldots, b_T$, shape `(T, D)`.
    - `init`: the state before the first step, $s_0$ (or $s_{T+1}$ when `reverse`).
        Defaults to zero.
    - `reverse`: Keyword only argument. If True, solve the reverse-time recurrence
        $s_t = A_t s_{t+1} + b_t$, $t = T, \ldots, 1$ instead.
    - `scan_impl`: Keyword only argument. `"xla"`, `"chunked"`, `"pallas"` or a
        [`parassm.linear.AbstractScanImpl`][]. Defaults to the innermost
        [`parassm.linear.scan_impl`][] block, else [`parassm.linear.AssociativeScan`][].

    **Returns:**

    The states $s_1, \ldots, s_T$, shape `(T, D)`.

    !!! example

        ```python
        a = jnp.full((5, 1), 0.5)
        b = jnp.ones((5, 1))
        parassm.linear.solve(parassm.linear.Diagonal(a), b)  # 1, 1.5, 1.75, ...
        ```
    """
    if transition.length != b.shape[0]:
        raise ValueError(
            f"`transition` has {transition.length} time steps but `b` has "
            f"{b.shape[0]}; they must match."
        )
    if isinstance(transition, Zero):
        return b
    a = transition.elements()
    if init is not None:
        edge = b.shape[0] - 1 if reverse else 0
        pushed = transition.apply(a[edge : edge + 1], init[None])[0]
        b = b.at[edge].add(pushed)

    impl = default_scan_impl() if scan_impl is None else as_scan_impl(scan_impl)
    return impl.scan(transition, b, reverse=reverse)
