"""``python -m moecompress`` (and ``torchrun -m moecompress``): the same CLI as the ``moecompress`` script."""

from .cli import entry

entry()
