"""The one base class of winnow's named errors. A stage turns any of them into one clear message and
a non-zero exit (winnow.stage) without importing the modules that raise them."""


class WinnowError(Exception):
    """A failure winnow names and explains: bad params, a bad shard, a failed gate, a missing task …"""


def report_unexpected(where: str) -> str:
    """The current exception's traceback for the user, every URL's credentials masked: a bug or an
    unnamed library error still shows where it came from, but never a secret a message carried
    (an MLflow or S3 URI with ``user:password@``)."""
    import traceback

    from winnow.track import scrub

    return f"\n{where}: FAILED (unexpected error)\n{scrub(traceback.format_exc())}"
