package main

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GroupVersion of the WebServer CRD (deploy/crds/webservers.kuwa.dev.yaml).
var GroupVersion = schema.GroupVersion{Group: "kuwa.dev", Version: "v1alpha1"}

// WebServer is kuwa.dev/v1alpha1 WebServer, hand-written (no code generators).
type WebServer struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   WebServerSpec    `json:"spec"`
	Status *WebServerStatus `json:"status,omitempty"`
}

// WebServerSpec mirrors the plugin's WebServerSpec.
type WebServerSpec struct {
	Content  string    `json:"content"`
	Replicas int32     `json:"replicas"`
	Software *Software `json:"software,omitempty"`
}

// Software is the web server software and its version. Pointers keep
// "absent" (serde default) apart from "set to empty" (invalid).
type Software struct {
	Name    string  `json:"name"`
	Version *string `json:"version,omitempty"`
}

// WebServerStatus mirrors the plugin's WebServerStatus.
type WebServerStatus struct {
	ReadyReplicas      int32              `json:"readyReplicas"`
	ObservedGeneration *int64             `json:"observedGeneration,omitempty"`
	Conditions         []metav1.Condition `json:"conditions"`
}

// WebServerList is a list of WebServers.
type WebServerList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []WebServer `json:"items"`
}

// DeepCopyInto copies s into out.
func (s *Software) DeepCopyInto(out *Software) {
	*out = *s
	if s.Version != nil {
		v := *s.Version
		out.Version = &v
	}
}

// DeepCopyInto copies s into out.
func (s *WebServerSpec) DeepCopyInto(out *WebServerSpec) {
	*out = *s
	if s.Software != nil {
		out.Software = new(Software)
		s.Software.DeepCopyInto(out.Software)
	}
}

// DeepCopyInto copies s into out.
func (s *WebServerStatus) DeepCopyInto(out *WebServerStatus) {
	*out = *s
	if s.ObservedGeneration != nil {
		g := *s.ObservedGeneration
		out.ObservedGeneration = &g
	}
	if s.Conditions != nil {
		out.Conditions = make([]metav1.Condition, len(s.Conditions))
		for i := range s.Conditions {
			s.Conditions[i].DeepCopyInto(&out.Conditions[i])
		}
	}
}

// DeepCopyInto copies w into out.
func (w *WebServer) DeepCopyInto(out *WebServer) {
	*out = *w
	out.TypeMeta = w.TypeMeta
	w.ObjectMeta.DeepCopyInto(&out.ObjectMeta)
	w.Spec.DeepCopyInto(&out.Spec)
	if w.Status != nil {
		out.Status = new(WebServerStatus)
		w.Status.DeepCopyInto(out.Status)
	}
}

// DeepCopy returns a deep copy of w.
func (w *WebServer) DeepCopy() *WebServer {
	if w == nil {
		return nil
	}
	out := new(WebServer)
	w.DeepCopyInto(out)
	return out
}

// DeepCopyObject implements runtime.Object.
func (w *WebServer) DeepCopyObject() runtime.Object {
	if c := w.DeepCopy(); c != nil {
		return c
	}
	return nil
}

// DeepCopyInto copies l into out.
func (l *WebServerList) DeepCopyInto(out *WebServerList) {
	*out = *l
	out.TypeMeta = l.TypeMeta
	l.ListMeta.DeepCopyInto(&out.ListMeta)
	if l.Items != nil {
		out.Items = make([]WebServer, len(l.Items))
		for i := range l.Items {
			l.Items[i].DeepCopyInto(&out.Items[i])
		}
	}
}

// DeepCopyObject implements runtime.Object.
func (l *WebServerList) DeepCopyObject() runtime.Object {
	if l == nil {
		return nil
	}
	out := new(WebServerList)
	l.DeepCopyInto(out)
	return out
}

// addToScheme registers WebServer and WebServerList.
func addToScheme(s *runtime.Scheme) error {
	s.AddKnownTypes(GroupVersion, &WebServer{}, &WebServerList{})
	metav1.AddToGroupVersion(s, GroupVersion)
	return nil
}
