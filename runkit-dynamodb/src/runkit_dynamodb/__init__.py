"""runkit_dynamodb."""
