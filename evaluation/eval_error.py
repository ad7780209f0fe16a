class EvalError(Exception):
    """Bad evaluation input or a broken evaluation environment; the message names the offending values."""
