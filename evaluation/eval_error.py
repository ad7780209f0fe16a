from codefill.errors import CodefillError


class EvalError(CodefillError):
    """Bad evaluation input or a broken evaluation environment; the message names the offending values."""
