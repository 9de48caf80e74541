__all__ = []  # filled in by the kernel work
