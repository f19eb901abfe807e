"""IAM enforcement in local mode: evaluator, call mapping, enforcement hooks and the mutation test."""
