"""Built-in distillkit losses, registered through the ``distillkit`` entry-point group."""
