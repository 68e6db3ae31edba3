package tvserve.plugin;

import io.prometheus.client.Collector;
import io.prometheus.client.GaugeMetricFamily;
import java.util.ArrayList;
import java.util.List;
import org.pytorch.serve.wlm.Model;
import org.pytorch.serve.wlm.ModelManager;
import org.pytorch.serve.wlm.WorkerState;
import org.pytorch.serve.wlm.WorkerThread;

/**
 * Each model version's workers as Prometheus gauges, read from TorchServe's model manager at every
 * scrape of the metrics port's /metrics (TorchServe has no such metric):
 *
 * <pre>
 * tvserve_ready_workers{ModelName, model_version}   workers READY (WORKER_MODEL_LOADED) now
 * tvserve_wanted_workers{ModelName, model_version}  the model's minimum workers
 * </pre>
 *
 * The alert "no READY worker" (deploy/prometheus/tvserve-rules.yml) reads the first.
 */
final class WorkerGauges extends Collector {
    private static final List<String> LABELS = List.of("ModelName", "model_version"); // as handlers/telemetry.py's
    private static boolean registered;

    private WorkerGauges() {}

    /** Adds the gauges to the registry the metrics port serves, once per process. */
    static synchronized void registerOnce() {
        if (!registered) {
            new WorkerGauges().register();
            registered = true;
        }
    }

    @Override
    public List<MetricFamilySamples> collect() {
        GaugeMetricFamily ready = new GaugeMetricFamily("tvserve_ready_workers",
                "Workers of the model version that are READY now", LABELS);
        GaugeMetricFamily wanted = new GaugeMetricFamily("tvserve_wanted_workers",
                "The model version's minimum workers", LABELS);
        ModelManager manager = ModelManager.getInstance();
        if (manager != null) {
            for (String name : ProtocolEndpoint.modelNames()) {
                for (String version : ProtocolEndpoint.versions(name)) {
                    Model model;
                    try {
                        model = manager.getModel(name, version);
                    } catch (org.pytorch.serve.archive.model.ModelVersionNotFoundException e) {
                        continue; // unregistered meanwhile
                    }
                    if (model != null) {
                        List<String> labels = List.of(name, version);
                        ready.addMetric(labels, readyWorkers(manager, model));
                        wanted.addMetric(labels, model.getMinWorkers());
                    }
                }
            }
        }
        List<MetricFamilySamples> families = new ArrayList<>();
        families.add(ready);
        families.add(wanted);
        return families;
    }

    static int readyWorkers(ModelManager manager, Model model) {
        int loaded = 0;
        for (WorkerThread worker : manager.getWorkers(model.getModelVersionName())) {
            if (worker.getState() == WorkerState.WORKER_MODEL_LOADED) {
                loaded++;
            }
        }
        return loaded;
    }
}
