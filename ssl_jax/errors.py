"""The one exception class for user mistakes.

A `UserError` is something the person running a command can fix: a bad config value, an unknown
variant, a missing dataset, a path that does not exist. The command-line entry points print its
message on one line (`error: config.train.batch_size=-3 must be positive`) and exit with status 2;
any other exception is our bug and keeps its traceback.
"""


class UserError(Exception):
  """A mistake in what was asked for; the message says what was wrong, where, and what to do."""
