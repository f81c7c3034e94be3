"""Errors a user can cause: the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """A problem with the user's input (recipe, files, environment), reported as one clear line."""


class TeacherError(Exception):
    """The teacher could not produce an anchor for one prompt (recorded per prompt, the run goes on)."""


def write_failed(path, error: BaseException) -> str:
    """The one line for a file pudl could not write (disk full, file-size limit, I/O error): what is already
    committed is kept, so freeing space and rerunning resumes."""
    reason = getattr(error, "strerror", None) or str(error)
    return f"{path}: cannot write ({reason}; disk full?); everything finished before is kept: free space and rerun"
