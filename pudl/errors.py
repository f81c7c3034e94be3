"""Errors a user can cause: the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """A problem with the user's input (recipe, files, environment), reported as one clear line."""


class TeacherError(Exception):
    """The teacher could not produce an anchor for one prompt (recorded per prompt, the run goes on)."""
