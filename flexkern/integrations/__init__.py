"""Bridges from flexkern to other libraries. Each submodule imports its library itself, so
``import flexkern`` never needs them:

    transformers   ``experts_implementation="flexkern"`` for transformers' MoE models
                   (``pip install flexkern[hf]``)
"""
