"""Graph passes of blazec, installed as ``blazec.passes``.

One module per pass. Each pass is a plain function ``fn(gm, ctx) -> PassReport``
registered in :mod:`blazec.passes.registry`, so it can be unit-tested on a toy
graph without the backend.
"""
