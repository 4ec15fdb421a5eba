

@pytest.mark.slow
def test_best_mixes_int8_and_fp16_by_measured_parity(trt_build) -> None:
    result = trt_build("best")
    summary = result.outputs["precision"].metrics
    assert summary["kept_precision"] == "FP16" and summary["kept_higher_precision"]
    report = json.loads(result.outputs["verify"].path("parity.json").read_text())
    assert report["status"] == "pass" and report["outputs"]["sentence_embedding"]["cosine_mean"] >= 0.99
    model = onnx.load(str(result.outputs["precision"].path("model.onnx")))
    kept = {node.name for node in model.graph.node if node.name in summary["kept_higher_precision"]}
    assert kept == set(summary["kept_higher_precision"])
    initializers = {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        if node.name in kept:  # FP16 weights, no Q/DQ
            assert initializers[node.input[1]] == onnx.TensorProto.FLOAT16
    dequantize = [node for node in model.graph.node if node.op_type == "DequantizeLinear"]
    assert dequantize and all(initializers[node.input[1]] == onnx.TensorProto.FLOAT16 for node in dequantize), \
        "scales in FP16: the dequantized tensors feed FP16 MatMuls"
