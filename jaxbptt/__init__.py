"""jaxbptt: backpropagation through time for JAX, with a hand-written reverse scan.

Pure step functions `step(params, carry, x) -> (carry, y)`, unrolled by `lax.scan`, differentiated
by a reverse scan that keeps only the carry adjoint in its sequential loop: exact and truncated
BPTT, per-step clipping, gradient-flow diagnostics and memory policies, each checked against
`jax.grad` of a plain `lax.scan` with the same semantics.
"""

from ._core.api import value_and_grad as value_and_grad
from ._core.methods import Autodiff as Autodiff
from ._core.methods import ReverseScan as ReverseScan
from ._cells.bidirectional import bidirectional as bidirectional
from ._cells.rnn import Cell as Cell
from ._cells.rnn import LSTMState as LSTMState
from ._cells.rnn import elman as elman
from ._cells.rnn import gru as gru
from ._cells.rnn import lstm as lstm
from ._cells.rnn import with_readout as with_readout
from ._cells.revcells import RevGRUState as RevGRUState
from ._cells.revcells import RevLSTMState as RevLSTMState
from ._cells.revcells import revgru as revgru
from ._cells.revcells import revlstm as revlstm
from ._cells.reversible import coupled as coupled
from ._cells.reversible import invertible as invertible
from ._cells.combinators import lengths_to_mask as lengths_to_mask
from ._cells.combinators import masked as masked
from ._cells.combinators import resettable as resettable
from ._cells.combinators import stacked as stacked
from ._parallel.deer import DeerInfo as DeerInfo
from ._parallel.deer import deer as deer
from ._engine.kernel import Kernel as Kernel
from ._parallel.linear_scan import linear_scan as linear_scan
from ._cells.modern import lru as lru
from ._cells.modern import mingru as mingru
from ._cells.modern import minlstm as minlstm
from ._cells.models import embedding as embedding
from ._cells.models import generate as generate
from ._engine.kernel import Step as Step
from ._online.tbptt import OnlineState as OnlineState
from ._parallel.data_parallel import data_parallel as data_parallel
from ._online.tbptt import OnlineTBPTT as OnlineTBPTT
from ._online.perturb import ES as ES
from ._online.perturb import NRES as NRES
from ._online.perturb import PES as PES
from ._online.grad import RTRL as RTRL
from ._online.grad import SnAp as SnAp
from ._online.grad import TBPTT as TBPTT
from ._online.grad import UORO as UORO
from ._online.grad import online_grad as online_grad
from ._online.train import Online as Online
from ._online.train import OnlineGradState as OnlineGradState
from ._online.train import online as online
from ._online.tbptt import online_tbptt as online_tbptt
from ._plot import plot_gradient_flow as plot_gradient_flow
from ._core.reference import check_grads as check_grads
from ._engine.remat import Binomial as Binomial
from ._engine.remat import Every as Every
from ._engine.remat import Invert as Invert
from ._engine.remat import Sqrt as Sqrt
from ._core.surrogates import clip_identity as clip_identity
from ._core.reference import reference_unroll as reference_unroll
from ._core.reference import reference_value_and_grad as reference_value_and_grad
from ._engine.reverse import Diagnostics as Diagnostics
from ._parallel.sweep import sharded_sweep as sharded_sweep
from ._training import make_train_step as make_train_step
from ._training import train_loop as train_loop
from ._core.api import diagnostics_probe as diagnostics_probe
from ._core.api import unroll as unroll

from . import adapters
from . import tasks

__version__ = "0.1.0"

__all__ = [
    "adapters",
    "Autodiff",
    "Binomial",
    "Cell",
    "DeerInfo",
    "Diagnostics",
    "ES",
    "Every",
    "Invert",
    "Kernel",
    "LSTMState",
    "NRES",
    "Online",
    "OnlineGradState",
    "OnlineState",
    "OnlineTBPTT",
    "PES",
    "RevGRUState",
    "RevLSTMState",
    "RTRL",
    "ReverseScan",
    "SnAp",
    "Sqrt",
    "Step",
    "TBPTT",
    "UORO",
    "bidirectional",
    "check_grads",
    "clip_identity",
    "coupled",
    "data_parallel",
    "deer",
    "diagnostics_probe",
    "elman",
    "embedding",
    "generate",
    "gru",
    "invertible",
    "lengths_to_mask",
    "linear_scan",
    "lru",
    "lstm",
    "make_train_step",
    "masked",
    "mingru",
    "minlstm",
    "online",
    "online_grad",
    "online_tbptt",
    "plot_gradient_flow",
    "reference_unroll",
    "reference_value_and_grad",
    "resettable",
    "revgru",
    "revlstm",
    "sharded_sweep",
    "stacked",
    "tasks",
    "train_loop",
    "unroll",
    "value_and_grad",
    "with_readout",
]
