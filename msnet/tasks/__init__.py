"""What each command does, built from the rooms below: ``msnet evaluate`` and ``msnet transfer``.

``msnet train``'s work is :func:`msnet.training.train`; ``msnet report``'s is :mod:`msnet.runs.report`.
"""
