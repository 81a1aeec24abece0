"""Model surgery in readable steps: probe → decide → create (→ replace, in ``convert.py``).

:mod:`~lightning_kr.conversion.weights` first asks whether the weights are trained (how the
attention heads start),
:mod:`~lightning_kr.conversion.probe` runs the model once as a training step would,
:mod:`~lightning_kr.conversion.decide` chooses what to replace (:mod:`~lightning_kr.conversion.targets`
matches the user's include / exclude), :mod:`~lightning_kr.conversion.create` builds the KR layers;
:func:`lightning_kr.kr_convert` puts them in place.
"""
