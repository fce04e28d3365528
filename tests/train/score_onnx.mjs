// Scores a model bundle's model.onnx with onnxruntime for Node, to show that the exported model is
// portable: nothing in it needs Python. Usage: node score_onnx.mjs model.onnx model.json rows.json
// rows.json holds {"rows": [[...feature values in model.json's order...], ...]}, null for a missing
// value (filled with model.json's imputed_medians when it has one); prints {"p_buy": [...]}, the
// positive class's probability of each row (docs/contracts.md, "Scoring model.onnx without this code").
import { readFileSync } from "node:fs";
import * as ort from "onnxruntime-node";

const [modelPath, metaPath, rowsPath] = process.argv.slice(2);
const meta = JSON.parse(readFileSync(metaPath, "utf8"));
const { rows } = JSON.parse(readFileSync(rowsPath, "utf8"));
const width = meta.features.length;
if (rows.some((row) => row.length !== width)) {
  throw new Error(`every row needs ${width} values, in model.json's feature order`);
}
const medians = meta.imputed_medians ?? {};
const names = meta.features.map((feature) => feature.name);
const filled = rows.map((row) => row.map((value, i) => value ?? medians[names[i]] ?? NaN));
const session = await ort.InferenceSession.create(modelPath);
const { input, probability_output: output, positive_index: positive } = meta.onnx;
const features = new ort.Tensor("float32", Float32Array.from(filled.flat()), [rows.length, width]);
const probabilities = (await session.run({ [input]: features }))[output];
const classes = probabilities.dims[1];
const pBuy = rows.map((_, i) => probabilities.data[i * classes + positive]);
process.stdout.write(JSON.stringify({ p_buy: pBuy }));
