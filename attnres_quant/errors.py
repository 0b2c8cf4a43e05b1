"""User-facing errors: one paragraph saying what went wrong, where, and how to fix it."""


class UserError(Exception):
    """Bad input (config, path, dataset, flag). The CLI prints it without a traceback."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        parts = [what.rstrip(".") + "."]
        if where:
            parts.append(f"Where: {where.rstrip('.')}.")
        if fix:
            parts.append(f"Fix: {fix.rstrip('.')}.")
        super().__init__(" ".join(parts))
