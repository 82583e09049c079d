"""The lab: questions answered from the project's DVC experiments (`gptlab compare`, `scaling`,
`report`, `recover`). Only the command line uses it; no stage of the pipeline runs it."""
