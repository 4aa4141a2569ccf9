"""Where the user's functions run."""
