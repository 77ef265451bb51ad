"""The sequence stage: models 1 and 2 over each study, their inputs, training and prediction."""
