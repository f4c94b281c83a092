"""Errors the Studio API raises for the user to read."""


class StudioError(ValueError):
    """A user-facing error from the Studio API (bad input or a failed action); nothing was written."""


def is_out_of_memory(e: BaseException) -> bool:
    """True for the ways torch and Python report running out of memory: MemoryError, torch.OutOfMemoryError
    (CUDA), and the CPU allocator's RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(e, MemoryError):
        return True
    if type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                            or "cannot allocate memory" in text)
