package tvserve.plugin;

import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import java.io.IOException;
import java.util.List;
import org.pytorch.serve.servingsdk.Context;
import org.pytorch.serve.servingsdk.annotations.Endpoint;
import org.pytorch.serve.servingsdk.annotations.helpers.EndpointTypes;
import org.pytorch.serve.servingsdk.http.Request;
import org.pytorch.serve.servingsdk.http.Response;
import org.pytorch.serve.wlm.Model;

/**
 * KServe's v1 protocol, every path under /v1 on the inference port:
 *
 * <pre>
 * GET  /v1/models                    {"models": [names]}
 * GET  /v1/models/{m}                {"name": m, "ready": bool}
 * POST /v1/models/{m}:predict        {"instances": [{"b64": ...}]} -> {"predictions": [...]} (protocol "v1")
 * POST /v1/models/{m}:explain        -> {"explanations": [...]}
 * </pre>
 */
@Endpoint(urlPattern = "v1", endpointType = EndpointTypes.INFERENCE,
        description = "KServe v1 (REST), routed to tvserve's handler")
public class KServeV1Endpoint extends ProtocolEndpoint {
    static final String PROTOCOL = "v1";

    @Override
    public void doGet(Request req, Response rsp, Context ctx) throws IOException {
        List<String> parts = segments(req);
        try {
            if (parts.size() == 1 && parts.get(0).equals("models")) {
                JsonArray names = new JsonArray();
                modelNames().forEach(names::add);
                JsonObject body = new JsonObject();
                body.add("models", names);
                json(rsp, 200, body);
                return;
            }
            if (parts.size() != 2 || !parts.get(0).equals("models") || parts.get(1).contains(":")) {
                throw new ClientError(404, "No such KServe v1 path: use GET /v1/models/{model} or POST "
                        + "/v1/models/{model}:predict or :explain.");
            }
            Model model = model(parts.get(1), null);
            JsonObject body = new JsonObject();
            body.addProperty("name", model.getModelName());
            body.addProperty("ready", ready(model));
            json(rsp, ready(model) ? 200 : 503, body);
        } catch (ClientError e) {
            reject(rsp, PROTOCOL, e);
        }
    }

    @Override
    public void doPost(Request req, Response rsp, Context ctx) throws IOException {
        List<String> parts = segments(req);
        try {
            String last = parts.size() == 2 && parts.get(0).equals("models") ? parts.get(1) : "";
            int colon = last.lastIndexOf(':');
            String verb = colon < 0 ? "" : last.substring(colon + 1);
            if (!verb.equals("predict") && !verb.equals("explain")) {
                throw new ClientError(404, "No such KServe v1 path: POST /v1/models/{model}:predict or :explain.");
            }
            Model model = model(last.substring(0, colon), null);
            forward(req, rsp, model, PROTOCOL, verb.equals("predict") ? "infer" : "explain");
        } catch (ClientError e) {
            reject(rsp, PROTOCOL, e);
        }
    }

    @Override
    String routesHint() {
        return "KServe v1: GET /v1/models/{model}, POST /v1/models/{model}:predict";
    }
}
