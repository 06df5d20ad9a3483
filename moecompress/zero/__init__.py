"""Zero experts (ZEDA): router rows whose expert outputs nothing and costs nothing.

A zero-expert model has, in every MoE router, ``Z`` rows beyond the ``E`` real experts; a token slot
routed to one of them (id in ``[E, E+Z)``) contributes 0 to the layer output and runs no expert.
The layout facts live in :mod:`.layout` (one place: the handle reads them from the config), the
routing semantics in :mod:`.routing` (pure functions), the transformers-side modules in
:mod:`.modules`; :mod:`.inject`, :mod:`.convert` and :mod:`.baselines` write zero-expert
checkpoints. See ``docs`` in :mod:`.layout` for the on-disk format.
"""
