"""The one base class of winnow's named errors. A stage turns any of them into one clear message and
a non-zero exit (winnow.stage) without importing the modules that raise them."""


class WinnowError(Exception):
    """A failure winnow names and explains: bad params, a bad shard, a failed gate, a missing task …"""
