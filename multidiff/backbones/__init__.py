"""Networks with one signature: ``forward(x, c_noise, cond) -> Tensor`` shaped like ``x``."""
