"""What every package shares and none owns; imports nothing of the project and nothing heavy, so
`model`, `connectors` and `pipeline` can all use it without depending on each other."""
