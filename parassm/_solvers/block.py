import equinox as eqx

from .. import _linear as linear
from . import _jacobian as jacobian
from ._parallel import AbstractNewtonSolver
from ._rules import Rules
from ._search import AbstractSearch, Undamped


class BlockQuasiDEER(AbstractNewtonSolver):
    r"""Quasi-Newton with the block-diagonal part of the Jacobian.

    The flattened state is cut into contiguous blocks of `block_size` components and
    each iteration keeps the `k x k` diagonal blocks of $J_t$: `O(T D k)` memory and
    `O(T D k^2)` scan work. Right for cells whose Jacobian is (nearly) block structured,
    e.g. several independent heads or units with a few coupled variables each
    (ParaRNN-style). `block_size=1` is [`parassm.QuasiDEER`][]; `block_size=D` is
    [`parassm.DEER`][].

    The blocks are extracted exactly, with one JVP per state component (`D` JVPs per
    step).

    **Arguments:**

    - `block_size`: `k`; the flattened state size must be a multiple of it.
    - `batch_size`: how many columns of the Jacobian (rounded to whole blocks) are
        formed at once; `None` forms all at once (`O(T D^2)` memory in passing).
    - `relinearise`: as for [`parassm.QuasiDEER`][], but zero by default (new blocks
        at every iterate): blocks chosen to hold the coupling make the steps Newton-like
        (superlinear), and kept maps would slow them (measured on an exactly
        block-diagonal system: 7 steps instead of 5 with `relinearise=0.25`).
    - `rtol`, `atol`, `search`: as for [`parassm.DEER`][].
    - `rules`: the loop's rules ([`parassm.Rules`][]; default: every rule but the
        restart at rest). `None` in place of a rule switches it off.
    """

    block_size: int = eqx.field(static=True)
    batch_size: int | None = eqx.field(default=None, static=True)
    rtol: float | None = None
    atol: float | None = None
    search: AbstractSearch = Undamped()
    rules: Rules = Rules()
    relinearise: float = 0.0

    def reuse_threshold(self, size, length):
        return self.relinearise

    def error_jacobians(self, size):
        # Blocks of the whole state are the Jacobians; smaller ones cost fewer JVPs
        # than the exact Jacobians would: its own maps either way.
        return False

    def __check_init__(self):
        if self.block_size < 1:
            raise ValueError(f"`block_size` must be at least 1, got {self.block_size}.")

    def check(self, flat):
        if flat.size % self.block_size != 0:
            raise ValueError(
                f"BlockQuasiDEER(block_size={self.block_size}) needs the state size to "
                f"be a multiple of the block size, but the flattened state has {flat.size} "
                "components. Choose a divisor of the state size."
            )

    def linearise(self, problem, s_prev, iteration):
        fs, blocks = jacobian.value_and_block_diagonal(
            problem.fn, s_prev, problem.xs, self.block_size, self.batch_size
        )
        return fs, linear.BlockDiagonal(blocks)
