"""moeserve's serving surface: the `moeserve` command line and (with its issue) the OpenAI-compatible HTTP API."""
