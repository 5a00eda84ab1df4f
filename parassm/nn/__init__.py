"""Equinox layers that evaluate recurrent cells in parallel."""

from ._rnn import ParallelRNN as ParallelRNN
