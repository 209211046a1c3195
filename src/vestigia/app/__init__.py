"""The `vestigia` command's work on the user's artefacts: loading, the method table, the commands."""
