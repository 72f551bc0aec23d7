"""The error every user mistake becomes: one line naming the field and the fix (exit status 2)."""


class RecipeError(ValueError):
    """A mistake in a recipe or its overrides, explained in one line."""
