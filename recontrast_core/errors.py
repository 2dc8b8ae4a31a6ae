"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (a file, a field, a setting). Never a bug in our code."""


class DataValidationError(UserError):
    """A dataset file fails validation. The message names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class WeightsUnavailableError(UserError):
    """Pretrained weights were asked for but cannot be reached (offline, missing file)."""
