"""The synthetic world of coloured shapes that move, and the small model trained on it.

`world.scenes` renders and captions its clips (for training, the demo clip and the
semantic tests), `world.train` trains the model (`python -m world.train OUT`), and
`world/checkpoint/` is the trained checkpoint the package ships and serves when no model
is given. The Slow-Fast model itself lives in `model`; nothing here is needed to run it
on another checkpoint.
"""
