"""The models-from-code file of the registered pyfunc (pipelines/model/packaging.py, `model_format`).

MLflow copies this file into every registered version and runs it when `mlflow.pyfunc.load_model`
loads one (`mlflow models serve`, a notebook): it names the model class and constructs it, so no
pickle is read. It imports the project's source that MLflow stores beside it (`code/pipelines`).
Nothing in the project imports this module; its import has the side effect MLflow asks for.
"""

from mlflow.models import set_model

from pipelines.model.packaging import LoraTextGenerator

set_model(LoraTextGenerator())
