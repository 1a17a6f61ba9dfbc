"""The sink stage (sinks/): the runner, the Cordial client and bulk path, the archive sink."""
