"""The build stages: small checked passes that hand each other files (see base.py).

Which stages run for a target and a model family is the plan's business (pipeline/build/plan.py).
"""
