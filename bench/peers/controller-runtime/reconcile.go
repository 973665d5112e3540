package main

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

const (
	fieldOwner            = "peer-controller-runtime"
	contentHashAnnotation = "kuwa.dev/content-hash"
	desiredHashAnnotation = "kuwa.dev/desired-hash"
	indexKey              = "index.html"
	configMapMaxBytes     = 1024 * 1024
	defaultVersion        = "1.27"
	// reconciledMessage is the message of the kuwa host's Degraded=False
	// after a successful reconcile: "reconciled by <plugin>@<version>"
	// (host/src/plan.rs status_write; the workspace version is 0.1.0).
	reconciledMessage = "reconciled by webserver@0.1.0"
)

// Counters served on /metrics.
var (
	writesTotal     atomic.Uint64
	reconcilesTotal atomic.Uint64
	appliesTotal    atomic.Uint64
	statusTotal     atomic.Uint64
	errorsTotal     atomic.Uint64
)

// Reconciler reconciles WebServers exactly like plugins/webserver run by
// the kuwa host.
type Reconciler struct {
	client.Client
	Resync time.Duration
}

// child is one desired child: its kind, the typed object to read it from
// the cache into, and the object to apply.
type child struct {
	name    string
	cached  client.Object
	desired map[string]any
}

// Reconcile implements reconcile.Reconciler.
func (r *Reconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	reconcilesTotal.Add(1)
	res, err := r.reconcile(ctx, req)
	if err != nil {
		errorsTotal.Add(1)
	}
	return res, err
}

func (r *Reconciler) reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	var ws WebServer
	if err := r.Get(ctx, req.NamespacedName, &ws); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if ws.DeletionTimestamp != nil {
		// No finalizer: the garbage collector removes the children.
		return ctrl.Result{}, nil
	}
	done := ctrl.Result{RequeueAfter: r.Resync}
	now := metav1.NewTime(time.Now().UTC().Truncate(time.Second))

	if err := validate(&ws.Spec); err != nil {
		return done, r.degrade(ctx, &ws, "InvalidSpec", err.Error(), now)
	}

	children := []child{
		{name: ws.Name + "-content", cached: &corev1.ConfigMap{}, desired: configMap(&ws)},
		{name: ws.Name, cached: &appsv1.Deployment{}, desired: deployment(&ws)},
		{name: ws.Name, cached: &corev1.Service{}, desired: service(&ws)},
	}
	// Read every child before writing any, so a conflict applies nothing.
	found := make([]bool, len(children))
	for i, c := range children {
		err := r.Get(ctx, types.NamespacedName{Namespace: ws.Namespace, Name: c.name}, c.cached)
		switch {
		case err == nil:
			found[i] = true
			if !controlledBy(c.cached, ws.UID) {
				msg := fmt.Sprintf("%s %q already exists and is not controlled by this parent%s; the host never adopts objects",
					c.desired["kind"], c.name, controllerOf(c.cached))
				return done, r.degrade(ctx, &ws, "ChildConflict", msg, now)
			}
		case apierrors.IsNotFound(err):
		default:
			return ctrl.Result{}, err
		}
	}

	// The status is computed from what was observed before any apply.
	var dep *appsv1.Deployment
	if found[1] {
		dep = children[1].cached.(*appsv1.Deployment)
	}
	status := webServerStatus(&ws, dep, now)

	owner := ownerReference(&ws)
	for i, c := range children {
		body := prepareChild(c.desired, ws.Namespace, owner)
		var cached client.Object
		if found[i] {
			cached = c.cached
		}
		need, err := needsApply(body, cached)
		if err != nil {
			return ctrl.Result{}, err
		}
		if !need {
			continue
		}
		writesTotal.Add(1)
		appliesTotal.Add(1)
		u := &unstructured.Unstructured{Object: body}
		if err := r.Apply(ctx, client.ApplyConfigurationFromUnstructured(u),
			client.FieldOwner(fieldOwner), client.ForceOwnership); err != nil {
			return ctrl.Result{}, err
		}
	}

	if !sameStatus(ws.Status, &status) {
		if err := r.applyStatus(ctx, &ws, &status); err != nil {
			return ctrl.Result{}, err
		}
	}
	return done, nil
}

// degrade reports a failed reconcile the kuwa host's way: the current
// status with Degraded=True (reason, message), nothing else written.
func (r *Reconciler) degrade(ctx context.Context, ws *WebServer, reason, message string, now metav1.Time) error {
	var status WebServerStatus
	if ws.Status != nil {
		ws.Status.DeepCopyInto(&status)
	}
	var current *metav1.Condition
	kept := status.Conditions[:0:0]
	for i := range status.Conditions {
		if status.Conditions[i].Type == "Degraded" {
			current = &status.Conditions[i]
		} else {
			kept = append(kept, status.Conditions[i])
		}
	}
	if current != nil {
		kept = append(kept, *current)
	}
	status.Conditions = kept
	upsertCondition(&status.Conditions, "Degraded", true, reason, message, ws.Generation, now)
	if sameStatus(ws.Status, &status) {
		return nil
	}
	return r.applyStatus(ctx, ws, &status)
}

// applyStatus server-side applies the status subresource.
func (r *Reconciler) applyStatus(ctx context.Context, ws *WebServer, status *WebServerStatus) error {
	conditions := make([]any, 0, len(status.Conditions))
	for _, c := range status.Conditions {
		m := map[string]any{
			"type":               c.Type,
			"status":             string(c.Status),
			"reason":             c.Reason,
			"message":            c.Message,
			"lastTransitionTime": c.LastTransitionTime.UTC().Format(time.RFC3339),
		}
		if c.ObservedGeneration != 0 {
			m["observedGeneration"] = c.ObservedGeneration
		}
		conditions = append(conditions, m)
	}
	st := map[string]any{
		"readyReplicas": int64(status.ReadyReplicas),
		"conditions":    conditions,
	}
	if status.ObservedGeneration != nil {
		st["observedGeneration"] = *status.ObservedGeneration
	}
	u := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": GroupVersion.String(),
		"kind":       "WebServer",
		"metadata":   map[string]any{"name": ws.Name, "namespace": ws.Namespace},
		"status":     st,
	}}
	writesTotal.Add(1)
	statusTotal.Add(1)
	return r.Status().Apply(ctx, client.ApplyConfigurationFromUnstructured(u),
		client.FieldOwner(fieldOwner), client.ForceOwnership)
}

func validate(spec *WebServerSpec) error {
	if spec.Replicas < 0 {
		return fmt.Errorf("spec.replicas must be 0 or more, got %d", spec.Replicas)
	}
	if len(spec.Content)+len(indexKey) > configMapMaxBytes {
		return fmt.Errorf("spec.content is %d bytes; a ConfigMap holds at most %d bytes", len(spec.Content), configMapMaxBytes)
	}
	v := version(spec)
	ok := v != ""
	for _, c := range v {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			ok = false
		}
	}
	if !ok {
		return fmt.Errorf("spec.software.version %q is not a valid image tag", v)
	}
	return nil
}

// version is spec.software.version with the plugin's serde defaults.
func version(spec *WebServerSpec) string {
	if spec.Software == nil || spec.Software.Version == nil {
		return defaultVersion
	}
	return *spec.Software.Version
}

// selectorLabels are the plugin's selector_labels.
func selectorLabels(ws *WebServer) map[string]any {
	return map[string]any{
		"app.kubernetes.io/name":     "webserver",
		"app.kubernetes.io/instance": ws.Name,
	}
}

// childMeta is kuwa_sdk::child_meta: name, namespace and the standard labels.
func childMeta(ws *WebServer, name string) map[string]any {
	return map[string]any{
		"name":      name,
		"namespace": ws.Namespace,
		"labels": map[string]any{
			"app.kubernetes.io/instance":   ws.Name,
			"app.kubernetes.io/managed-by": "kuwa",
		},
	}
}

// The children as the plugin serialises them (k8s-openapi omits unset
// fields), so the subset check looks at exactly the plugin's fields.

func configMap(ws *WebServer) map[string]any {
	return map[string]any{
		"apiVersion": "v1",
		"kind":       "ConfigMap",
		"metadata":   childMeta(ws, ws.Name+"-content"),
		"data":       map[string]any{indexKey: ws.Spec.Content},
	}
}

func deployment(ws *WebServer) map[string]any {
	meta := childMeta(ws, ws.Name)
	labels := meta["labels"].(map[string]any)
	for k, v := range selectorLabels(ws) {
		labels[k] = v
	}
	return map[string]any{
		"apiVersion": "apps/v1",
		"kind":       "Deployment",
		"metadata":   meta,
		"spec": map[string]any{
			"replicas": int64(ws.Spec.Replicas),
			"selector": map[string]any{"matchLabels": selectorLabels(ws)},
			"template": map[string]any{
				"metadata": map[string]any{
					"labels": selectorLabels(ws),
					"annotations": map[string]any{
						contentHashAnnotation: contentHash([]byte(ws.Spec.Content)),
					},
				},
				"spec": map[string]any{
					"containers": []any{map[string]any{
						"name":  "nginx",
						"image": "nginx:" + version(&ws.Spec),
						"ports": []any{map[string]any{
							"name":          "http",
							"containerPort": int64(80),
						}},
						"volumeMounts": []any{map[string]any{
							"name":      "content",
							"mountPath": "/usr/share/nginx/html",
							"readOnly":  true,
						}},
					}},
					"volumes": []any{map[string]any{
						"name":      "content",
						"configMap": map[string]any{"name": ws.Name + "-content"},
					}},
				},
			},
		},
	}
}

func service(ws *WebServer) map[string]any {
	return map[string]any{
		"apiVersion": "v1",
		"kind":       "Service",
		"metadata":   childMeta(ws, ws.Name),
		"spec": map[string]any{
			"selector": selectorLabels(ws),
			"ports": []any{map[string]any{
				"name":       "http",
				"port":       int64(80),
				"targetPort": "http",
			}},
		},
	}
}

// ownerReference is the controller reference the kuwa host sets on children.
func ownerReference(ws *WebServer) map[string]any {
	return map[string]any{
		"apiVersion":         GroupVersion.String(),
		"kind":               "WebServer",
		"name":               ws.Name,
		"uid":                string(ws.UID),
		"controller":         true,
		"blockOwnerDeletion": true,
	}
}

// prepareChild adds the namespace and owner reference, then the hash of the
// result as the desired-hash annotation (like the host's prepare_child).
func prepareChild(object map[string]any, namespace string, owner map[string]any) map[string]any {
	meta := object["metadata"].(map[string]any)
	meta["namespace"] = namespace
	meta["ownerReferences"] = []any{owner}
	hash := hashValue(object)
	annotations, _ := meta["annotations"].(map[string]any)
	if annotations == nil {
		annotations = map[string]any{}
		meta["annotations"] = annotations
	}
	annotations[desiredHashAnnotation] = hash
	return object
}

// needsApply: the child is missing, the desired object changed since the
// last apply (hash annotation), or someone changed a field we set (drift).
func needsApply(desired map[string]any, cached client.Object) (bool, error) {
	if cached == nil {
		return true, nil
	}
	want := desired["metadata"].(map[string]any)["annotations"].(map[string]any)[desiredHashAnnotation]
	if have, ok := cached.GetAnnotations()[desiredHashAnnotation]; !ok || have != want {
		return true, nil
	}
	actual, err := runtime.DefaultUnstructuredConverter.ToUnstructured(cached)
	if err != nil {
		return false, err
	}
	delete(actual, "apiVersion")
	delete(actual, "kind")
	for k, v := range desired {
		if k == "apiVersion" || k == "kind" {
			continue
		}
		if !isSubset(map[string]any{k: v}, actual) {
			return true, nil
		}
	}
	return false, nil
}

func controlledBy(obj client.Object, uid types.UID) bool {
	for _, o := range obj.GetOwnerReferences() {
		if o.Controller != nil && *o.Controller && o.UID == uid {
			return true
		}
	}
	return false
}

func controllerOf(obj client.Object) string {
	for _, o := range obj.GetOwnerReferences() {
		if o.Controller != nil && *o.Controller {
			return fmt.Sprintf(", but by %s %q", o.Kind, o.Name)
		}
	}
	return ""
}

// webServerStatus is the plugin's status() followed by the host's Degraded
// condition (the host replaces the plugin's Degraded=False "the spec is
// valid" with its own Degraded=False reconciledMessage, keeping the current
// Degraded's lastTransitionTime unless it flips).
func webServerStatus(ws *WebServer, d *appsv1.Deployment, now metav1.Time) WebServerStatus {
	want := ws.Spec.Replicas
	var ready int32
	rolledOut := false
	if d != nil {
		st := d.Status
		// Rust: observedGeneration.is_some() && observedGeneration >= generation.
		current := st.ObservedGeneration != 0 && st.ObservedGeneration >= d.Generation
		specMatches := d.Spec.Replicas != nil && *d.Spec.Replicas == want
		ready = st.ReadyReplicas
		rolledOut = current && specMatches && ready == want && st.UpdatedReplicas == want && st.Replicas == want
	}
	var previous []metav1.Condition
	if ws.Status != nil {
		previous = ws.Status.Conditions
	}
	gen := ws.Generation
	msg := fmt.Sprintf("%d/%d replicas ready", ready, want)
	var out []metav1.Condition
	if rolledOut {
		out = append(out,
			condition(previous, "Available", true, "ReplicasReady", msg, gen, now),
			condition(previous, "Progressing", false, "RolloutComplete", "the Deployment is rolled out", gen, now))
	} else {
		out = append(out,
			condition(previous, "Available", false, "ReplicasNotReady", msg, gen, now),
			condition(previous, "Progressing", true, "RollingOut", "waiting for the Deployment to roll out", gen, now))
	}
	out = append(out, condition(previous, "Degraded", false, "AsExpected", reconciledMessage, gen, now))
	g := gen
	return WebServerStatus{ReadyReplicas: ready, ObservedGeneration: &g, Conditions: out}
}

// condition is kuwa_sdk::Conditions::set: lastTransitionTime is kept from a
// previous condition of the same type and status, else now.
func condition(previous []metav1.Condition, typ string, value bool, reason, message string, gen int64, now metav1.Time) metav1.Condition {
	status := metav1.ConditionFalse
	if value {
		status = metav1.ConditionTrue
	}
	since := now
	for _, p := range previous {
		if p.Type == typ && p.Status == status {
			since = p.LastTransitionTime
			break
		}
	}
	return metav1.Condition{
		Type: typ, Status: status, Reason: reason, Message: message,
		LastTransitionTime: since, ObservedGeneration: gen,
	}
}

// upsertCondition is the host's upsert_condition: replace in place (keeping
// lastTransitionTime unless the status flips) or append.
func upsertCondition(conditions *[]metav1.Condition, typ string, value bool, reason, message string, gen int64, now metav1.Time) {
	c := condition(*conditions, typ, value, reason, message, gen, now)
	for i := range *conditions {
		if (*conditions)[i].Type == typ {
			if (*conditions)[i].Status != c.Status || (*conditions)[i].LastTransitionTime.IsZero() {
				c.LastTransitionTime = now
			} else {
				c.LastTransitionTime = (*conditions)[i].LastTransitionTime
			}
			(*conditions)[i] = c
			return
		}
	}
	*conditions = append(*conditions, c)
}

// sameStatus compares the current status with the computed one.
func sameStatus(current, want *WebServerStatus) bool {
	if current == nil {
		return false
	}
	if current.ReadyReplicas != want.ReadyReplicas {
		return false
	}
	if (current.ObservedGeneration == nil) != (want.ObservedGeneration == nil) ||
		current.ObservedGeneration != nil && *current.ObservedGeneration != *want.ObservedGeneration {
		return false
	}
	if len(current.Conditions) != len(want.Conditions) {
		return false
	}
	for i := range want.Conditions {
		a, b := current.Conditions[i], want.Conditions[i]
		if a.Type != b.Type || a.Status != b.Status || a.Reason != b.Reason || a.Message != b.Message ||
			a.ObservedGeneration != b.ObservedGeneration || !a.LastTransitionTime.Equal(&b.LastTransitionTime) {
			return false
		}
	}
	return true
}
