"""Developer tools: synthetic trace runs for tests and benchmarks (``synth``) and the builder of the
embedded demo models (``demo_model``).
"""
