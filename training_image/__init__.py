"""SageMaker training image: entry point train.py and its modules."""
